//! The seed updater protocol, per fleet, under `/seed/{secret}`: devices still running the
//! original updater keep working and appear in the fleet, so that they can be moved to the
//! Drover agent (by deploying a release whose `update.sh` installs it) without a site visit.
//!
//! What the hub adds over the seed hub, without the device noticing: a release that failed on a
//! device is offered again only after a backoff (1, 2, 4 minutes ...), and after three failures
//! it is held until an operator retries or deploys; the seed updater itself has neither, and
//! would otherwise download and run a failing update every five seconds forever.

use std::time::Duration;

use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, header};
use axum::response::Response;
use drover_protocol::device::{DeviceStatus, UpdatePhase, UpdateStatus};
use drover_protocol::ids::DeviceId;
use drover_protocol::seed::{HowItWorkedOut, TimeResponse, UpdateMeQuery, UpdateMeResponse};
use time::OffsetDateTime;
use time::macros::format_description;

use crate::error::{ApiError, ApiJson, ApiQuery};
use crate::state::HubState;
use crate::store::{Device, Fleet, Release, Reported, SeedCheckin, now_ms};

/// Failures of one release before the hub holds it for a seed device.
pub const SEED_MAX_FAILURES: i64 = 3;
/// The first wait after a failure; it doubles with each further failure.
pub const SEED_BACKOFF_BASE: Duration = Duration::from_secs(60);

async fn fleet_for(hub: &HubState, secret: &str) -> Result<Fleet, ApiError> {
    hub.store
        .fleet_by_seed_secret(secret)
        .await?
        .ok_or_else(|| ApiError::not_found("this seed protocol URL (wrong secret, or turned off)"))
}

fn parse_device_id(text: &str) -> Result<DeviceId, ApiError> {
    DeviceId::parse(text).map_err(|e| ApiError::bad_request("invalid_device_id", e.to_string()))
}

/// The URL a seed device reaches the hub at, for absolute download URLs.
///
/// The host comes from `Host` (HTTP/1.1) or the request's authority (HTTP/2 has no `Host`).
fn base_url(hub: &HubState, headers: &HeaderMap, uri: &axum::http::Uri) -> String {
    if let Some(url) = &hub.config.public_url {
        return url.trim_end_matches('/').to_string();
    }
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| uri.authority().map(|a| a.as_str()))
        .unwrap_or("localhost");
    let scheme = if hub.config.tls.is_some() {
        "https"
    } else {
        "http"
    };
    format!("{scheme}://{host}")
}

/// `GET {base}/updateme`.
pub async fn updateme(
    State(hub): State<HubState>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    Path(secret): Path<String>,
    headers: HeaderMap,
    uri: axum::http::Uri,
    ApiQuery(query): ApiQuery<UpdateMeQuery>,
) -> Result<axum::Json<UpdateMeResponse>, ApiError> {
    let fleet = fleet_for(&hub, &secret).await?;
    let device_id = parse_device_id(&query.device_id)?;
    let snapshot = query.snapshot();
    let current = if snapshot > 0 {
        hub.store
            .release_by_seq(fleet.org_id, fleet.id, snapshot)
            .await?
    } else {
        None
    };
    let poll = SeedCheckin {
        device_id,
        updater_version: query.updater_version.clone().unwrap_or_default(),
        snapshot,
        current_release: current.map(|r| r.version),
        remote_ip: Some(peer.ip().to_string()),
    };
    let device = hub
        .store
        .seed_checkin(fleet.org_id, fleet.id, fleet.auto_accept, &poll)
        .await?;
    let interval = u64::try_from(fleet.poll_interval_s).ok();
    let no_update = axum::Json(UpdateMeResponse::no_update_needed(interval));
    if device.status != DeviceStatus::Accepted {
        return Ok(no_update);
    }
    let Some(target) = crate::desired::target_release(&hub.store, &device, &fleet).await? else {
        return Ok(no_update);
    };
    if target.seq == snapshot {
        set_phase(&hub, &device, UpdateStatus::idle()).await?;
        return Ok(no_update);
    }
    let Some(download_type) = target.format.seed_download_type() else {
        let status = held(
            &target,
            0,
            "the seed updater cannot install tar.gz releases; release a zip or a script",
        );
        set_phase(&hub, &device, status).await?;
        return Ok(no_update);
    };
    if let Some(status) = backoff(&hub, &device, &fleet, &target).await? {
        set_phase(&hub, &device, status).await?;
        return Ok(no_update);
    }
    set_phase(
        &hub,
        &device,
        UpdateStatus {
            phase: UpdatePhase::Installing,
            release: Some(target.version.clone()),
            failures: 0,
            message: None,
        },
    )
    .await?;
    let config = crate::desired::effective_config(&fleet, &device);
    Ok(axum::Json(UpdateMeResponse {
        status: "updateNeeded".into(),
        snapshot_id: Some(target.seq.to_string()),
        download_url: Some(format!(
            "{}/seed/{secret}/artifacts/{}",
            base_url(&hub, &headers, &uri),
            target.sha256
        )),
        download_type: Some(download_type.into()),
        config: Some(config),
        update_interval: interval,
        ssh_tunnel_requested: None,
    }))
}

fn held(target: &Release, failures: i64, why: &str) -> UpdateStatus {
    UpdateStatus {
        phase: UpdatePhase::Held,
        release: Some(target.version.clone()),
        failures: u32::try_from(failures).unwrap_or(u32::MAX),
        message: Some(why.to_string()),
    }
}

/// Whether the target must wait (backing off) or is held, from the device's failures since
/// the last deploy or retry.
async fn backoff(
    hub: &HubState,
    device: &Device,
    fleet: &Fleet,
    target: &Release,
) -> Result<Option<UpdateStatus>, ApiError> {
    let deployed_at = hub
        .store
        .target_updated_at(fleet.org_id, fleet.id, &device.device_type)
        .await?
        .unwrap_or(0);
    let since = deployed_at.max(device.retry_requested_at.unwrap_or(0));
    let (failures, last) = hub
        .store
        .failures_since(device.org_id, &device.id, &target.version, since)
        .await?;
    if failures == 0 {
        return Ok(None);
    }
    if failures >= SEED_MAX_FAILURES {
        return Ok(Some(held(
            target,
            failures,
            &format!(
                "failed {failures} times; 'drover device retry {}' tries again",
                device.id
            ),
        )));
    }
    let wait_ms = i64::try_from(SEED_BACKOFF_BASE.as_millis()).unwrap_or(60_000)
        << (failures - 1).clamp(0, 10);
    let retry_at = last.unwrap_or(0) + wait_ms;
    if now_ms() < retry_at {
        return Ok(Some(UpdateStatus {
            phase: UpdatePhase::BackingOff,
            release: Some(target.version.clone()),
            failures: u32::try_from(failures).unwrap_or(u32::MAX),
            message: Some(format!(
                "failed {failures} time(s); next try after a backoff"
            )),
        }));
    }
    Ok(None)
}

async fn set_phase(hub: &HubState, device: &Device, update: UpdateStatus) -> Result<(), ApiError> {
    if device.update == update {
        return Ok(());
    }
    let reported = Reported {
        current_release: device.current_release.clone(),
        agent_version: device.agent_version.clone(),
        update,
    };
    hub.store.record_reported(&device.id, &reported).await?;
    Ok(())
}

/// `POST {base}/howitworkedout`.
pub async fn howitworkedout(
    State(hub): State<HubState>,
    Path(secret): Path<String>,
    ApiJson(body): ApiJson<HowItWorkedOut>,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    let fleet = fleet_for(&hub, &secret).await?;
    let device_id = parse_device_id(&body.device_id)?;
    let device = hub
        .store
        .device(fleet.org_id, &device_id)
        .await?
        .filter(|d| d.fleet_id == fleet.id)
        .ok_or_else(|| ApiError::not_found(format!("device {device_id} in this fleet")))?;
    let snapshot: i64 = body.snapshot_id.trim().parse().map_err(|_| {
        ApiError::bad_request(
            "invalid_snapshot",
            format!("snapshotId must be a number, got {:?}", body.snapshot_id),
        )
    })?;
    let release = hub
        .store
        .release_by_seq(fleet.org_id, fleet.id, snapshot)
        .await?
        .map_or_else(|| format!("snapshot-{snapshot}"), |r| r.version);
    let output =
        drover_protocol::device::truncate_output(&body.output, drover_protocol::MAX_OUTPUT_BYTES);
    hub.store
        .record_seed_outcome(fleet.org_id, &device_id, &release, body.success, &output)
        .await?;
    let phase = if body.success {
        UpdateStatus::idle()
    } else {
        UpdateStatus {
            phase: UpdatePhase::BackingOff,
            release: Some(release.clone()),
            failures: device.update.failures.saturating_add(1),
            message: Some("update.sh failed".into()),
        }
    };
    let mut device = device;
    if body.success {
        device.current_release = Some(release);
    }
    set_phase(&hub, &device, phase).await?;
    Ok(axum::Json(serde_json::json!({ "status": "ok" })))
}

/// `GET {base}/time`.
pub async fn time(
    State(hub): State<HubState>,
    Path(secret): Path<String>,
) -> Result<axum::Json<TimeResponse>, ApiError> {
    fleet_for(&hub, &secret).await?;
    Ok(axum::Json(TimeResponse {
        data: iso_time(OffsetDateTime::now_utc()),
    }))
}

/// ISO-8601 in UTC with milliseconds, as JavaScript's `Date.toISOString()` writes it.
pub fn iso_time(t: OffsetDateTime) -> String {
    let format =
        format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");
    t.format(&format).unwrap_or_default()
}

/// `GET {base}/artifacts/{sha256}`: the secret in the URL is the only credential a seed
/// device has.
pub async fn artifact(
    State(hub): State<HubState>,
    Path((secret, sha256)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let fleet = fleet_for(&hub, &secret).await?;
    let allowed = crate::artifacts::is_sha256_hex(&sha256)
        && hub
            .store
            .fleet_has_artifact(fleet.org_id, fleet.id, &sha256)
            .await?;
    if !allowed {
        return Err(ApiError::not_found(format!(
            "artifact {sha256} in this fleet"
        )));
    }
    super::download::serve_artifact(hub.artifacts.as_ref(), &sha256, &headers).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_looks_like_javascript_iso_strings() {
        let t = OffsetDateTime::from_unix_timestamp_nanos(1_495_378_800_123_456_789).unwrap();
        assert_eq!(iso_time(t), "2017-05-21T15:00:00.123Z");
    }
}

/// The most measurements or events one seed notification may carry (the seed's largest known
/// backlog was 36,000 events).
pub const SEED_MAX_POINTS: usize = 100_000;

/// `POST {base}/modbusnotification` body.
#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ModbusNotification {
    /// The device's ID.
    pub device_id: String,
    /// The readings.
    pub measurements: Vec<ModbusMeasurement>,
}

/// One reading of a Modbus meter's cumulative energy register.
#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ModbusMeasurement {
    /// The meter's serial number (a string or a number).
    pub serial_number: serde_json::Value,
    /// The cumulative register, in Wh.
    pub energy: f64,
    /// ISO-8601.
    pub time: String,
}

/// `POST {base}/energynotification` body: one meter's events, or a list of them.
#[derive(Debug, serde::Deserialize)]
#[serde(untagged)]
pub enum EnergyNotification {
    /// Several meters (the seed's normal body).
    Many(Vec<MeterEvents>),
    /// One meter (how the seed split big backlogs).
    One(MeterEvents),
}

/// One pulse meter's energy events.
#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MeterEvents {
    /// The meter's name (a string or a number).
    pub meter_name: serde_json::Value,
    /// Its events.
    pub events: Vec<EnergyEvent>,
}

/// Energy counted in one interval.
#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnergyEvent {
    /// When the interval ended (ISO-8601).
    pub end_time: String,
    /// Its length in seconds.
    #[serde(default)]
    pub seconds: Option<f64>,
    /// Energy in Wh.
    pub energy: f64,
}

fn json_text(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn parse_iso(text: &str) -> Result<i64, ApiError> {
    let t = OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).map_err(
        |_| {
            ApiError::bad_request(
                "invalid_time",
                format!("times are ISO-8601 such as 2017-05-21T15:00:00.000Z, got {text:?}"),
            )
        },
    )?;
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000)
        .map_err(|_| ApiError::bad_request("invalid_time", "time out of range"))
}

/// Scaled integers for values that may have decimals: whole Wh when all of them are whole,
/// else thousandths.
fn scaled(values: &[f64]) -> Result<(i8, Vec<i64>), ApiError> {
    if values.iter().any(|v| !v.is_finite() || v.abs() > 9.0e15) {
        return Err(ApiError::bad_request(
            "invalid_energy",
            "energy values must be finite numbers",
        ));
    }
    if values.iter().all(|v| v.fract() == 0.0) {
        return Ok((0, values.iter().map(|v| *v as i64).collect()));
    }
    Ok((
        -3,
        values.iter().map(|v| (v * 1000.0).round() as i64).collect(),
    ))
}

fn meter_id(prefix: &str, name: &str) -> Result<drover_protocol::reading::MeterId, ApiError> {
    drover_protocol::reading::MeterId::parse(&format!("{prefix}-{name}"))
        .map_err(|e| ApiError::bad_request("invalid_meter", e.to_string()))
}

/// Only an accepted device's readings are stored. The seed's meter readers keep what was not
/// answered with 2xx and send it again, so a device waiting for acceptance loses nothing: its
/// readings arrive once an operator accepts it.
fn may_send_readings(device: &DeviceId, status: DeviceStatus) -> Result<(), ApiError> {
    match status {
        DeviceStatus::Accepted => Ok(()),
        DeviceStatus::Pending => Err(ApiError::forbidden(
            "device_pending",
            format!(
                "device {device} waits to be accepted ('drover device accept {device}'); \
                 nothing was stored; send the readings again once it is"
            ),
        )),
        DeviceStatus::Revoked => Err(ApiError::forbidden(
            "device_revoked",
            format!("device {device} was revoked; nothing was stored"),
        )),
    }
}

async fn store_seed_points(
    hub: &HubState,
    fleet: &Fleet,
    device: DeviceId,
    series: Vec<crate::telemetry::fold::SeriesPoints>,
    bytes: usize,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    let horizon = now_ms() + crate::api::telemetry::MAX_FUTURE_MS;
    if series
        .iter()
        .flat_map(|s| &s.points)
        .any(|p| p.ts > horizon)
    {
        return Err(ApiError::new(
            axum::http::StatusCode::UNPROCESSABLE_ENTITY,
            "implausible_batch",
            "a reading lies more than 10 minutes ahead of the hub's clock; check the device's clock",
        ));
    }
    let job = crate::telemetry::fold::IngestJob {
        org_id: fleet.org_id,
        device,
        seq: None,
        series,
        bytes: bytes as u64,
        frame: None,
    };
    match hub.ingest.submit(job).await {
        Ok(_) => Ok(axum::Json(serde_json::json!({ "status": "ok" }))),
        Err(crate::telemetry::queue::QueueError::Full { .. }) => Err(ApiError::new(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "queue_full",
            "the hub is busy; nothing was stored; send the same readings again",
        )),
        Err(e) => Err(ApiError::internal(e)),
    }
}

/// `POST {base}/modbusnotification`: cumulative register readings of Modbus meters, as the
/// seed's meter reader sent them. A resend of the same readings is stored once (points are
/// deduplicated on meter and time).
pub async fn modbusnotification(
    State(hub): State<HubState>,
    Path(secret): Path<String>,
    body: axum::body::Bytes,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    let fleet = fleet_for(&hub, &secret).await?;
    let note: ModbusNotification = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(
            "invalid_body",
            format!("not a modbusnotification body: {e}"),
        )
    })?;
    if note.measurements.len() > SEED_MAX_POINTS {
        return Err(ApiError::new(
            axum::http::StatusCode::PAYLOAD_TOO_LARGE,
            "too_many_measurements",
            format!("send at most {SEED_MAX_POINTS} measurements per request"),
        ));
    }
    let device_id = parse_device_id(&note.device_id)?;
    let status = if fleet.auto_accept {
        DeviceStatus::Accepted
    } else {
        DeviceStatus::Pending
    };
    let device = hub
        .store
        .ensure_seed_device(
            fleet.org_id,
            fleet.id,
            &device_id,
            status,
            crate::store::PROTOCOL_SEED,
            "seed",
        )
        .await?;
    may_send_readings(&device_id, device.status)?;
    let mut by_meter: std::collections::BTreeMap<String, Vec<(i64, f64)>> = Default::default();
    for m in &note.measurements {
        by_meter
            .entry(json_text(&m.serial_number))
            .or_default()
            .push((parse_iso(&m.time)?, m.energy));
    }
    let mut series = Vec::new();
    for (serial, readings) in by_meter {
        let (scale, values) = scaled(&readings.iter().map(|(_, e)| *e).collect::<Vec<_>>())?;
        let mut points: Vec<crate::telemetry::fold::Point> = readings
            .iter()
            .zip(values)
            .map(|((ts, _), value)| crate::telemetry::fold::Point {
                ts: *ts,
                value,
                clock: 2,
            })
            .collect();
        points.sort_by_key(|p| p.ts);
        series.push(crate::telemetry::fold::SeriesPoints {
            meter: meter_id("modbus", &serial)?,
            channel: drover_protocol::reading::Channel::EnergyImport,
            scale,
            points,
        });
    }
    store_seed_points(&hub, &fleet, device_id, series, body.len()).await
}

/// `POST {base}/energynotification`: the seed's pulse meters' energy per interval. These
/// carry no device ID, so their series belong to one placeholder device per fleet
/// (`seedmeters-<n>`). Events are deduplicated on (meter, end time), as the seed's design asked.
pub async fn energynotification(
    State(hub): State<HubState>,
    Path(secret): Path<String>,
    body: axum::body::Bytes,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    let fleet = fleet_for(&hub, &secret).await?;
    let note: EnergyNotification = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(
            "invalid_body",
            format!("not an energynotification body: {e}"),
        )
    })?;
    let meters = match note {
        EnergyNotification::Many(m) => m,
        EnergyNotification::One(m) => vec![m],
    };
    if meters.iter().map(|m| m.events.len()).sum::<usize>() > SEED_MAX_POINTS {
        return Err(ApiError::new(
            axum::http::StatusCode::PAYLOAD_TOO_LARGE,
            "too_many_events",
            format!("send at most {SEED_MAX_POINTS} events per request"),
        ));
    }
    let device_id = parse_device_id(&format!("seedmeters-{}", fleet.id))?;
    let device = hub
        .store
        .ensure_seed_device(
            fleet.org_id,
            fleet.id,
            &device_id,
            DeviceStatus::Accepted,
            "seed-meters",
            "seed-pulse-meter",
        )
        .await?;
    may_send_readings(&device_id, device.status)?;
    let mut series = Vec::new();
    for meter in meters {
        let energies: Vec<f64> = meter.events.iter().map(|e| e.energy).collect();
        let (scale, values) = scaled(&energies)?;
        let mut points = Vec::with_capacity(values.len());
        for (event, value) in meter.events.iter().zip(values) {
            if event
                .seconds
                .is_some_and(|s| !(0.0..=86_400.0).contains(&s))
            {
                return Err(ApiError::bad_request(
                    "invalid_event",
                    "an event's seconds must be 0 to 86400",
                ));
            }
            points.push(crate::telemetry::fold::Point {
                ts: parse_iso(&event.end_time)?,
                value,
                clock: 2,
            });
        }
        points.sort_by_key(|p| p.ts);
        series.push(crate::telemetry::fold::SeriesPoints {
            meter: meter_id("pulse", &json_text(&meter.meter_name))?,
            channel: drover_protocol::reading::Channel::EnergyInterval,
            scale,
            points,
        });
    }
    store_seed_points(&hub, &fleet, device_id, series, body.len()).await
}
