//! Devices: identity, standing, what they report, and the operator's per-device settings.

use std::collections::BTreeMap;

use drover_protocol::device::{DeviceStatus, Facts, TelemetryStatus, UpdatePhase, UpdateStatus};
use drover_protocol::ids::DeviceId;
use serde::Serialize;
use sqlx::Row as _;
use sqlx::any::AnyRow;

use super::{Store, StoreError, StoreResult, json_column, now_ms};

/// How a device talks to the hub.
pub const PROTOCOL_DROVER: &str = "drover";
/// A device running the seed updater.
pub const PROTOCOL_SEED: &str = "seed";

/// A device as the hub knows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Device {
    /// Its short ID.
    pub id: DeviceId,
    /// The organization.
    pub org_id: i64,
    /// The fleet.
    pub fleet_id: i64,
    /// Its device type.
    pub device_type: String,
    /// Pending, accepted or revoked.
    pub status: DeviceStatus,
    /// `drover` or `seed`.
    pub protocol: String,
    /// Its identity public key (Drover agents only).
    pub public_key: Option<String>,
    /// The agent's (or seed updater's) version.
    pub agent_version: String,
    /// The release it runs, as it last reported.
    pub current_release: Option<String>,
    /// The snapshot a seed device last reported.
    pub seed_snapshot: Option<i64>,
    /// Its update state, as it last reported.
    pub update: UpdateStatus,
    /// Facts it reported.
    pub facts: Facts,
    /// The address its last check-in came from.
    pub remote_ip: Option<String>,
    /// The device's own config (merged over the fleet's).
    pub config: serde_json::Value,
    /// A release pinned to this device, overriding the fleet's target.
    pub pinned_release_id: Option<i64>,
    /// Raised by `drover device retry`.
    pub retry_generation: i64,
    /// When an operator last asked for held releases to be retried.
    pub retry_requested_at: Option<i64>,
    /// The highest update-report sequence number stored.
    pub last_report_seq: i64,
    /// When it last checked in (Unix milliseconds).
    pub last_seen: Option<i64>,
    /// When it enrolled.
    pub created_at: i64,
    /// The site it is installed at.
    pub site_id: Option<i64>,
    /// Its telemetry as it last reported it (spool, drops, data budget).
    pub telemetry: Option<TelemetryStatus>,
    /// Telemetry bytes the hub received from it.
    pub telemetry_bytes: i64,
    /// Readings of its numbered batches that the store already held (same series and time).
    pub duplicate_points: i64,
    /// Readings its spool dropped, as it last reported.
    pub spool_dropped: i64,
}

/// What enrolling a device stores.
#[derive(Debug, Clone)]
pub struct NewDevice {
    /// The fleet.
    pub fleet_id: i64,
    /// Its device type.
    pub device_type: String,
    /// Pending or accepted.
    pub status: DeviceStatus,
    /// Its identity public key.
    pub public_key: String,
    /// The hash of its credential.
    pub credential_hash: String,
    /// The agent's version.
    pub agent_version: String,
    /// Its facts.
    pub facts: Facts,
}

/// What a check-in reported, minus presence (stored only when it changes).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reported {
    /// The committed release.
    pub current_release: Option<String>,
    /// The agent's version.
    pub agent_version: String,
    /// The update state.
    pub update: UpdateStatus,
}

/// Presence from a check-in, written in batches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presence {
    /// When (Unix milliseconds).
    pub at: i64,
    /// The connection's source address.
    pub remote_ip: Option<String>,
    /// Uptime, if the check-in carried facts.
    pub uptime_s: Option<u64>,
}

/// Filters for listing devices.
#[derive(Debug, Clone, Default)]
pub struct DeviceFilter {
    /// Only this fleet.
    pub fleet_id: Option<i64>,
    /// Only this status.
    pub status: Option<DeviceStatus>,
    /// At most this many (default 1000).
    pub limit: Option<i64>,
}

/// What a seed-protocol poll tells the hub.
#[derive(Debug, Clone)]
pub struct SeedCheckin {
    /// The device's self-made ID.
    pub device_id: DeviceId,
    /// The updater's version.
    pub updater_version: String,
    /// The snapshot it runs.
    pub snapshot: i64,
    /// The release that snapshot is, if the fleet has it.
    pub current_release: Option<String>,
    /// Where the poll came from.
    pub remote_ip: Option<String>,
}

/// A device type (hardware and architecture) and how many devices have it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeviceType {
    /// Its name, such as `raspberrypi4-arm64`.
    pub name: String,
    /// The CPU architecture its devices report, such as `aarch64`.
    pub arch: String,
    /// How many devices of the organization have it.
    pub devices: i64,
    /// When it was first seen.
    pub created_at: i64,
}

/// Devices of a fleet that look alike, counted (the rows of a fleet's status view).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeviceGroup {
    /// Device type.
    pub device_type: String,
    /// Standing.
    pub status: DeviceStatus,
    /// The release they run.
    pub current_release: Option<String>,
    /// Their update phase.
    pub update_phase: String,
    /// A release pinned to them.
    pub pinned_release_id: Option<i64>,
    /// How many.
    pub count: i64,
    /// How many were seen since the given time.
    pub online: i64,
}

macro_rules! device_columns {
    () => {
        "id, org_id, fleet_id, device_type, status, protocol, public_key, \
     agent_version, current_release, seed_snapshot, update_phase, update_release, \
     update_failures, update_message, os, arch, hostname, ip, remote_ip, uptime_s, tags, \
     attributes, config, pinned_release_id, retry_generation, retry_requested_at, \
     last_report_seq, last_seen, created_at, site_id, telemetry, telemetry_bytes, spool_dropped, \
     duplicate_points"
    };
}

fn device_from_row(row: &AnyRow) -> StoreResult<Device> {
    let status: String = row.try_get("status")?;
    let phase: String = row.try_get("update_phase")?;
    let id: String = row.try_get("id")?;
    let tags: Vec<String> = json_column(row, "tags")?;
    let attributes: BTreeMap<String, String> = json_column(row, "attributes")?;
    Ok(Device {
        id: DeviceId::parse(&id).map_err(|e| StoreError::Corrupt(e.to_string()))?,
        org_id: row.try_get("org_id")?,
        fleet_id: row.try_get("fleet_id")?,
        device_type: row.try_get("device_type")?,
        status: DeviceStatus::parse(&status)
            .ok_or_else(|| StoreError::Corrupt(format!("device status {status:?}")))?,
        protocol: row.try_get("protocol")?,
        public_key: row.try_get("public_key")?,
        agent_version: row.try_get("agent_version")?,
        current_release: row.try_get("current_release")?,
        seed_snapshot: row.try_get("seed_snapshot")?,
        update: UpdateStatus {
            phase: parse_phase(&phase)?,
            release: row.try_get("update_release")?,
            failures: u32::try_from(row.try_get::<i64, _>("update_failures")?).unwrap_or(0),
            message: row.try_get("update_message")?,
        },
        facts: Facts {
            os: row.try_get("os")?,
            arch: row.try_get("arch")?,
            ip: row.try_get("ip")?,
            uptime_s: u64::try_from(row.try_get::<i64, _>("uptime_s")?).unwrap_or(0),
            hostname: row.try_get("hostname")?,
            tags,
            attributes,
        },
        remote_ip: row.try_get("remote_ip")?,
        config: json_column(row, "config")?,
        pinned_release_id: row.try_get("pinned_release_id")?,
        retry_generation: row.try_get("retry_generation")?,
        retry_requested_at: row.try_get("retry_requested_at")?,
        last_report_seq: row.try_get("last_report_seq")?,
        last_seen: row.try_get("last_seen")?,
        created_at: row.try_get("created_at")?,
        site_id: row.try_get("site_id")?,
        telemetry: row
            .try_get::<Option<String>, _>("telemetry")?
            .and_then(|t| serde_json::from_str(&t).ok()),
        telemetry_bytes: row.try_get("telemetry_bytes")?,
        duplicate_points: row.try_get("duplicate_points")?,
        spool_dropped: row.try_get("spool_dropped")?,
    })
}

fn parse_phase(text: &str) -> StoreResult<UpdatePhase> {
    Ok(match text {
        "idle" => UpdatePhase::Idle,
        "downloading" => UpdatePhase::Downloading,
        "installing" => UpdatePhase::Installing,
        "backing_off" => UpdatePhase::BackingOff,
        "held" => UpdatePhase::Held,
        other => return Err(StoreError::Corrupt(format!("update phase {other:?}"))),
    })
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn json_text<T: Serialize>(value: &T) -> String {
    // Serializing plain maps and vectors of strings cannot fail.
    serde_json::to_string(value).unwrap_or_else(|_| "null".into())
}

impl Store {
    /// Enrols a device with a fresh random ID (retrying on the rare collision).
    pub async fn create_device(&self, org_id: i64, new: &NewDevice) -> StoreResult<Device> {
        for _ in 0..8 {
            let id = DeviceId::generate();
            let now = now_ms();
            let accepted_at = (new.status == DeviceStatus::Accepted).then_some(now);
            let result = sqlx::query(concat!(
                "INSERT INTO devices (id, org_id, fleet_id, device_type, status, protocol,
                    public_key, credential_hash, agent_version, update_phase, update_failures,
                    os, arch, hostname, ip, uptime_s, tags, attributes, config, retry_generation,
                    last_report_seq, created_at, accepted_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 'idle', 0, $10, $11, $12, $13, $14,
                    $15, $16, '{}', 0, 0, $17, $18)
                 RETURNING ",
                device_columns!()
            ))
            .bind(id.as_str())
            .bind(org_id)
            .bind(new.fleet_id)
            .bind(&new.device_type)
            .bind(new.status.as_str())
            .bind(PROTOCOL_DROVER)
            .bind(&new.public_key)
            .bind(&new.credential_hash)
            .bind(&new.agent_version)
            .bind(&new.facts.os)
            .bind(&new.facts.arch)
            .bind(&new.facts.hostname)
            .bind(&new.facts.ip)
            .bind(to_i64(new.facts.uptime_s))
            .bind(json_text(&new.facts.tags))
            .bind(json_text(&new.facts.attributes))
            .bind(now)
            .bind(accepted_at)
            .fetch_one(&self.pool)
            .await;
            match result {
                Ok(row) => return device_from_row(&row),
                Err(sqlx::Error::Database(db)) if db.is_unique_violation() => {
                    // Either the random ID collided (try another) or the public key is taken.
                    if self.device_by_public_key(&new.public_key).await?.is_some() {
                        return Err(StoreError::Conflict("a device with this public key".into()));
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(StoreError::Conflict(
            "a device ID (eight random IDs in a row collided)".into(),
        ))
    }

    /// The device holding an identity public key.
    pub async fn device_by_public_key(&self, public_key: &str) -> StoreResult<Option<Device>> {
        let row = sqlx::query(concat!(
            "SELECT ",
            device_columns!(),
            " FROM devices WHERE public_key = $1"
        ))
        .bind(public_key)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(device_from_row).transpose()
    }

    /// Gives a device a new credential (re-enrolment with the same key), replacing the old.
    pub async fn replace_credential(&self, device_id: &DeviceId, hash: &str) -> StoreResult<()> {
        sqlx::query("UPDATE devices SET credential_hash = $1 WHERE id = $2")
            .bind(hash)
            .bind(device_id.as_str())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The device a credential belongs to.
    pub async fn device_by_credential(&self, hash: &str) -> StoreResult<Option<Device>> {
        let row = sqlx::query(concat!(
            "SELECT ",
            device_columns!(),
            " FROM devices WHERE credential_hash = $1"
        ))
        .bind(hash)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(device_from_row).transpose()
    }

    /// One device of an organization.
    pub async fn device(&self, org_id: i64, id: &DeviceId) -> StoreResult<Option<Device>> {
        let row = sqlx::query(concat!(
            "SELECT ",
            device_columns!(),
            " FROM devices WHERE org_id = $1 AND id = $2"
        ))
        .bind(org_id)
        .bind(id.as_str())
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(device_from_row).transpose()
    }

    /// An organization's devices, by ID.
    pub async fn list_devices(
        &self,
        org_id: i64,
        filter: &DeviceFilter,
    ) -> StoreResult<Vec<Device>> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            device_columns!(),
            " FROM devices
             WHERE org_id = $1 AND ($2 < 0 OR fleet_id = $2) AND ($3 = '' OR status = $3)
             ORDER BY id LIMIT $4"
        ))
        .bind(org_id)
        .bind(filter.fleet_id.unwrap_or(-1))
        .bind(filter.status.map_or("", DeviceStatus::as_str))
        .bind(filter.limit.unwrap_or(1000))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(device_from_row).collect()
    }

    /// Sets a device's standing. A revoked device keeps its credential hash, so that its requests
    /// are answered "revoked" rather than "unknown"; it is refused everywhere all the same.
    pub async fn set_device_status(
        &self,
        org_id: i64,
        id: &DeviceId,
        status: DeviceStatus,
    ) -> StoreResult<bool> {
        let now = now_ms();
        let sql = match status {
            DeviceStatus::Accepted => {
                "UPDATE devices SET status = $1, accepted_at = $2 WHERE org_id = $3 AND id = $4 AND status = 'pending'"
            }
            DeviceStatus::Revoked => {
                "UPDATE devices SET status = $1, revoked_at = $2 WHERE org_id = $3 AND id = $4"
            }
            // Nothing moves a device back to pending.
            DeviceStatus::Pending => return Ok(false),
        };
        let done = sqlx::query(sql)
            .bind(status.as_str())
            .bind(now)
            .bind(org_id)
            .bind(id.as_str())
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Stores what a check-in reported, when it changed.
    pub async fn record_reported(&self, id: &DeviceId, reported: &Reported) -> StoreResult<()> {
        sqlx::query(
            "UPDATE devices SET current_release = $1, agent_version = $2, update_phase = $3,
                update_release = $4, update_failures = $5, update_message = $6
             WHERE id = $7",
        )
        .bind(&reported.current_release)
        .bind(&reported.agent_version)
        .bind(reported.update.phase.as_str())
        .bind(&reported.update.release)
        .bind(i64::from(reported.update.failures))
        .bind(&reported.update.message)
        .bind(id.as_str())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Stores a device's facts.
    pub async fn record_facts(&self, id: &DeviceId, facts: &Facts) -> StoreResult<()> {
        sqlx::query(
            "UPDATE devices SET os = $1, arch = $2, hostname = $3, ip = $4, uptime_s = $5,
                tags = $6, attributes = $7
             WHERE id = $8",
        )
        .bind(&facts.os)
        .bind(&facts.arch)
        .bind(&facts.hostname)
        .bind(&facts.ip)
        .bind(to_i64(facts.uptime_s))
        .bind(json_text(&facts.tags))
        .bind(json_text(&facts.attributes))
        .bind(id.as_str())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Stores a device's telemetry status (and the highest drop count it reported).
    pub async fn record_telemetry(
        &self,
        id: &DeviceId,
        status: &TelemetryStatus,
    ) -> StoreResult<()> {
        sqlx::query(
            "UPDATE devices SET telemetry = $1,
                spool_dropped = CASE WHEN spool_dropped > $2 THEN spool_dropped ELSE $2 END
             WHERE id = $3",
        )
        .bind(json_text(status))
        .bind(to_i64(status.dropped))
        .bind(id.as_str())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Writes a batch of presence updates in one transaction.
    pub async fn flush_presence(&self, batch: &[(DeviceId, Presence)]) -> StoreResult<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut tx = self.begin_write().await?;
        for (id, p) in batch {
            sqlx::query(
                "UPDATE devices SET
                    last_seen = CASE WHEN last_seen IS NULL OR last_seen < $1 THEN $1 ELSE last_seen END,
                    remote_ip = COALESCE($2, remote_ip),
                    uptime_s = COALESCE($3, uptime_s)
                 WHERE id = $4",
            )
            .bind(p.at)
            .bind(&p.remote_ip)
            .bind(p.uptime_s.map(to_i64))
            .bind(id.as_str())
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Sets a device's own config.
    pub async fn set_device_config(
        &self,
        org_id: i64,
        id: &DeviceId,
        config: &serde_json::Value,
    ) -> StoreResult<bool> {
        let done = sqlx::query("UPDATE devices SET config = $1 WHERE org_id = $2 AND id = $3")
            .bind(config.to_string())
            .bind(org_id)
            .bind(id.as_str())
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Pins a release to a device (or unpins with `None`), and raises its retry generation so
    /// that a held release may be tried again.
    pub async fn set_device_pin(
        &self,
        org_id: i64,
        id: &DeviceId,
        release_id: Option<i64>,
    ) -> StoreResult<bool> {
        let done = sqlx::query(
            "UPDATE devices SET pinned_release_id = $1, retry_generation = retry_generation + 1,
                retry_requested_at = $2
             WHERE org_id = $3 AND id = $4",
        )
        .bind(release_id)
        .bind(now_ms())
        .bind(org_id)
        .bind(id.as_str())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Raises a device's retry generation: it forgets held releases and tries again.
    pub async fn bump_retry_generation(&self, org_id: i64, id: &DeviceId) -> StoreResult<bool> {
        let done = sqlx::query(
            "UPDATE devices SET retry_generation = retry_generation + 1, retry_requested_at = $1
             WHERE org_id = $2 AND id = $3",
        )
        .bind(now_ms())
        .bind(org_id)
        .bind(id.as_str())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Records a seed-protocol poll, creating the device the first time it is seen (pending or
    /// accepted per the fleet). A device ID already used by another fleet or organization is
    /// refused with a conflict.
    pub async fn seed_checkin(
        &self,
        org_id: i64,
        fleet_id: i64,
        auto_accept: bool,
        poll: &SeedCheckin,
    ) -> StoreResult<Device> {
        let now = now_ms();
        if let Some(existing) = self.device_any_org(&poll.device_id).await? {
            if existing.org_id != org_id || existing.fleet_id != fleet_id {
                return Err(StoreError::Conflict(format!(
                    "device ID {} (in another fleet)",
                    poll.device_id
                )));
            }
            sqlx::query(
                "UPDATE devices SET agent_version = $1, seed_snapshot = $2, current_release = $3,
                    last_seen = $4, remote_ip = COALESCE($5, remote_ip)
                 WHERE org_id = $6 AND id = $7",
            )
            .bind(&poll.updater_version)
            .bind(poll.snapshot)
            .bind(&poll.current_release)
            .bind(now)
            .bind(&poll.remote_ip)
            .bind(org_id)
            .bind(poll.device_id.as_str())
            .execute(&self.pool)
            .await?;
        } else {
            let status = if auto_accept {
                DeviceStatus::Accepted
            } else {
                DeviceStatus::Pending
            };
            sqlx::query(
                "INSERT INTO devices (id, org_id, fleet_id, device_type, status, protocol,
                    agent_version, current_release, seed_snapshot, update_phase, update_failures,
                    os, arch, hostname, remote_ip, uptime_s, tags, attributes, config,
                    retry_generation, last_report_seq, last_seen, created_at, accepted_at)
                 VALUES ($1, $2, $3, 'seed', $4, $5, $6, $7, $8, 'idle', 0, '', '', '', $9, 0,
                    '[]', '{}', '{}', 0, 0, $10, $10, $11)
                 ON CONFLICT (id) DO NOTHING",
            )
            .bind(poll.device_id.as_str())
            .bind(org_id)
            .bind(fleet_id)
            .bind(status.as_str())
            .bind(PROTOCOL_SEED)
            .bind(&poll.updater_version)
            .bind(&poll.current_release)
            .bind(poll.snapshot)
            .bind(&poll.remote_ip)
            .bind(now)
            .bind((status == DeviceStatus::Accepted).then_some(now))
            .execute(&self.pool)
            .await?;
        }
        self.device(org_id, &poll.device_id)
            .await?
            .ok_or_else(|| StoreError::Conflict(format!("device ID {}", poll.device_id)))
    }

    /// The device a seed meter format names, created the first time (pending or accepted per
    /// `status`) with the given protocol and device type. A device ID already used by another
    /// fleet or organization is refused with a conflict.
    pub async fn ensure_seed_device(
        &self,
        org_id: i64,
        fleet_id: i64,
        id: &DeviceId,
        status: DeviceStatus,
        protocol: &str,
        device_type: &str,
    ) -> StoreResult<Device> {
        let now = now_ms();
        sqlx::query(
            "INSERT INTO devices (id, org_id, fleet_id, device_type, status, protocol,
                agent_version, update_phase, update_failures, os, arch, hostname, uptime_s, tags,
                attributes, config, retry_generation, last_report_seq, created_at, accepted_at)
             VALUES ($1, $2, $3, $4, $5, $6, '', 'idle', 0, '', '', '', 0, '[]', '{}', '{}', 0, 0,
                $7, $8)
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(id.as_str())
        .bind(org_id)
        .bind(fleet_id)
        .bind(device_type)
        .bind(status.as_str())
        .bind(protocol)
        .bind(now)
        .bind((status == DeviceStatus::Accepted).then_some(now))
        .execute(&self.pool)
        .await?;
        match self.device_any_org(id).await? {
            Some(d) if d.org_id == org_id && d.fleet_id == fleet_id => Ok(d),
            _ => Err(StoreError::Conflict(format!(
                "device ID {id} (in another fleet)"
            ))),
        }
    }

    /// A device by ID in whatever organization it is (for the seed protocol's collision check
    /// only; never returned to a client).
    async fn device_any_org(&self, id: &DeviceId) -> StoreResult<Option<Device>> {
        let row = sqlx::query(concat!(
            "SELECT ",
            device_columns!(),
            " FROM devices WHERE id = $1"
        ))
        .bind(id.as_str())
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(device_from_row).transpose()
    }

    /// A fleet's devices grouped by type, standing, release, phase and pin, with how many of
    /// each group were seen since `online_since` (Unix milliseconds).
    pub async fn fleet_device_groups(
        &self,
        org_id: i64,
        fleet_id: i64,
        online_since: i64,
    ) -> StoreResult<Vec<DeviceGroup>> {
        let rows = sqlx::query(
            "SELECT device_type, status, current_release, update_phase, pinned_release_id,
                COUNT(*) AS n,
                SUM(CASE WHEN last_seen >= $3 THEN 1 ELSE 0 END) AS online
             FROM devices WHERE org_id = $1 AND fleet_id = $2
             GROUP BY device_type, status, current_release, update_phase, pinned_release_id
             ORDER BY device_type, status, current_release, update_phase",
        )
        .bind(org_id)
        .bind(fleet_id)
        .bind(online_since)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let status: String = row.try_get("status")?;
                Ok(DeviceGroup {
                    device_type: row.try_get("device_type")?,
                    status: DeviceStatus::parse(&status)
                        .ok_or_else(|| StoreError::Corrupt(format!("device status {status:?}")))?,
                    current_release: row.try_get("current_release")?,
                    update_phase: row.try_get("update_phase")?,
                    pinned_release_id: row.try_get("pinned_release_id")?,
                    count: row.try_get("n")?,
                    online: row.try_get("online")?,
                })
            })
            .collect()
    }

    /// Records a device type seen at enrolment (its architecture as the device reports it).
    pub async fn record_device_type(&self, org_id: i64, name: &str, arch: &str) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO device_types (org_id, name, arch, created_at) VALUES ($1, $2, $3, $4)
             ON CONFLICT (org_id, name) DO UPDATE SET arch = CASE
                WHEN excluded.arch = '' THEN device_types.arch ELSE excluded.arch END",
        )
        .bind(org_id)
        .bind(name)
        .bind(arch)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// An organization's device types, by name, with device counts.
    pub async fn list_device_types(&self, org_id: i64) -> StoreResult<Vec<DeviceType>> {
        let rows = sqlx::query(
            "SELECT t.name, t.arch, t.created_at, COUNT(d.id) AS n
             FROM device_types t
             LEFT JOIN devices d ON d.org_id = t.org_id AND d.device_type = t.name
             WHERE t.org_id = $1
             GROUP BY t.name, t.arch, t.created_at ORDER BY t.name",
        )
        .bind(org_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(DeviceType {
                    name: row.try_get("name")?,
                    arch: row.try_get("arch")?,
                    devices: row.try_get("n")?,
                    created_at: row.try_get("created_at")?,
                })
            })
            .collect()
    }
}
