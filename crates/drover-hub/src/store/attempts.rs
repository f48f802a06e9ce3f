//! Update attempts: each try of a release on a device, its state history and captured output.
//!
//! Reports carry a per-device sequence number. They are applied in one transaction that first
//! locks the device row, skips every report at or below the highest number already stored, and
//! then records the new highest; so a batch resent after a lost answer changes nothing, and two
//! copies of one batch arriving at once cannot both apply.

use drover_protocol::device::{ReportState, UpdateReport};
use drover_protocol::ids::DeviceId;
use serde::Serialize;
use sqlx::Row as _;

use super::{Store, StoreResult, now_ms};

/// One update attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AttemptRecord {
    /// Database ID.
    pub id: i64,
    /// The device.
    pub device_id: String,
    /// The release version.
    pub release: String,
    /// Which attempt at this release (from 1).
    pub attempt: i64,
    /// The latest state.
    pub state: String,
    /// The latest message.
    pub message: Option<String>,
    /// The captured output.
    pub output: Option<String>,
    /// When it started (hub time, Unix milliseconds).
    pub started_at: i64,
    /// When it last changed.
    pub updated_at: i64,
    /// Its state history, oldest first.
    pub events: Vec<AttemptEvent>,
}

/// One step in an attempt's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AttemptEvent {
    /// The state reached.
    pub state: String,
    /// What the device said.
    pub message: Option<String>,
    /// When, by the device's clock (Unix milliseconds).
    pub at: i64,
    /// When the hub received it.
    pub received_at: i64,
}

impl Store {
    /// Applies update reports from a device, skipping any already stored. Returns the highest
    /// sequence number now stored.
    pub async fn apply_reports(
        &self,
        org_id: i64,
        device_id: &DeviceId,
        reports: &[UpdateReport],
    ) -> StoreResult<u64> {
        let mut tx = self.begin_write().await?;
        let row = sqlx::query(
            "UPDATE devices SET last_report_seq = last_report_seq
             WHERE org_id = $1 AND id = $2 RETURNING last_report_seq",
        )
        .bind(org_id)
        .bind(device_id.as_str())
        .fetch_one(&mut *tx)
        .await?;
        let mut last: i64 = row.try_get("last_report_seq")?;
        let received_at = now_ms();
        for report in reports {
            let seq = i64::try_from(report.seq).unwrap_or(i64::MAX);
            if seq <= last {
                continue;
            }
            let row = sqlx::query(
                "INSERT INTO update_attempts (org_id, device_id, release_version, attempt, state,
                    message, output, started_at, updated_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8)
                 ON CONFLICT (device_id, release_version, attempt) DO UPDATE SET
                    state = excluded.state,
                    message = COALESCE(excluded.message, update_attempts.message),
                    output = COALESCE(excluded.output, update_attempts.output),
                    updated_at = excluded.updated_at
                 RETURNING id",
            )
            .bind(org_id)
            .bind(device_id.as_str())
            .bind(&report.release)
            .bind(i64::from(report.attempt))
            .bind(report.state.as_str())
            .bind(&report.message)
            .bind(&report.output)
            .bind(received_at)
            .fetch_one(&mut *tx)
            .await?;
            let attempt_id: i64 = row.try_get("id")?;
            sqlx::query(
                "INSERT INTO attempt_events (org_id, attempt_id, state, message, at, received_at)
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(org_id)
            .bind(attempt_id)
            .bind(report.state.as_str())
            .bind(&report.message)
            .bind(report.at_ms)
            .bind(received_at)
            .execute(&mut *tx)
            .await?;
            last = seq;
        }
        sqlx::query("UPDATE devices SET last_report_seq = $1 WHERE org_id = $2 AND id = $3")
            .bind(last)
            .bind(org_id)
            .bind(device_id.as_str())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(u64::try_from(last).unwrap_or(0))
    }

    /// Records what a seed device said in `howitworkedout`: a new, finished attempt.
    pub async fn record_seed_outcome(
        &self,
        org_id: i64,
        device_id: &DeviceId,
        release: &str,
        success: bool,
        output: &str,
    ) -> StoreResult<()> {
        let now = now_ms();
        let state = if success {
            ReportState::Success
        } else {
            ReportState::Failure
        };
        let mut tx = self.begin_write().await?;
        let row = sqlx::query(
            "SELECT COALESCE(MAX(attempt), 0) AS n FROM update_attempts
             WHERE org_id = $1 AND device_id = $2 AND release_version = $3",
        )
        .bind(org_id)
        .bind(device_id.as_str())
        .bind(release)
        .fetch_one(&mut *tx)
        .await?;
        let attempt: i64 = row.try_get::<i64, _>("n")? + 1;
        let message = if success {
            "update.sh succeeded (seed updater)"
        } else {
            "update.sh failed (seed updater)"
        };
        let row = sqlx::query(
            "INSERT INTO update_attempts (org_id, device_id, release_version, attempt, state,
                message, output, started_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8) RETURNING id",
        )
        .bind(org_id)
        .bind(device_id.as_str())
        .bind(release)
        .bind(attempt)
        .bind(state.as_str())
        .bind(message)
        .bind(output)
        .bind(now)
        .fetch_one(&mut *tx)
        .await?;
        let attempt_id: i64 = row.try_get("id")?;
        sqlx::query(
            "INSERT INTO attempt_events (org_id, attempt_id, state, message, at, received_at)
             VALUES ($1, $2, $3, $4, $5, $5)",
        )
        .bind(org_id)
        .bind(attempt_id)
        .bind(state.as_str())
        .bind(message)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        if success {
            sqlx::query("UPDATE devices SET current_release = $1 WHERE org_id = $2 AND id = $3")
                .bind(release)
                .bind(org_id)
                .bind(device_id.as_str())
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// A device's update attempts, newest first, with their histories.
    pub async fn list_attempts(
        &self,
        org_id: i64,
        device_id: &DeviceId,
        limit: i64,
    ) -> StoreResult<Vec<AttemptRecord>> {
        let rows = sqlx::query(
            "SELECT id, device_id, release_version, attempt, state, message, output, started_at,
                updated_at
             FROM update_attempts WHERE org_id = $1 AND device_id = $2
             ORDER BY id DESC LIMIT $3",
        )
        .bind(org_id)
        .bind(device_id.as_str())
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        let mut attempts = Vec::with_capacity(rows.len());
        for row in rows {
            let id: i64 = row.try_get("id")?;
            let events = sqlx::query(
                "SELECT state, message, at, received_at FROM attempt_events
                 WHERE org_id = $1 AND attempt_id = $2 ORDER BY id",
            )
            .bind(org_id)
            .bind(id)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|e| {
                Ok(AttemptEvent {
                    state: e.try_get("state")?,
                    message: e.try_get("message")?,
                    at: e.try_get("at")?,
                    received_at: e.try_get("received_at")?,
                })
            })
            .collect::<StoreResult<Vec<_>>>()?;
            attempts.push(AttemptRecord {
                id,
                device_id: row.try_get("device_id")?,
                release: row.try_get("release_version")?,
                attempt: row.try_get("attempt")?,
                state: row.try_get("state")?,
                message: row.try_get("message")?,
                output: row.try_get("output")?,
                started_at: row.try_get("started_at")?,
                updated_at: row.try_get("updated_at")?,
                events,
            });
        }
        Ok(attempts)
    }

    /// How often a release failed on a device since `since` (Unix milliseconds), and when it
    /// last failed: the seed protocol's server-side backoff and hold.
    pub async fn failures_since(
        &self,
        org_id: i64,
        device_id: &DeviceId,
        release: &str,
        since: i64,
    ) -> StoreResult<(i64, Option<i64>)> {
        let row = sqlx::query(
            "SELECT COUNT(*) AS n, MAX(updated_at) AS last FROM update_attempts
             WHERE org_id = $1 AND device_id = $2 AND release_version = $3
                AND state IN ('failure', 'rolled_back') AND started_at >= $4",
        )
        .bind(org_id)
        .bind(device_id.as_str())
        .bind(release)
        .bind(since)
        .fetch_one(&self.pool)
        .await?;
        Ok((row.try_get("n")?, row.try_get("last")?))
    }
}
