//! Releases and what fleets target.
//!
//! A release is immutable once created: its artifact, hash, size and signature never change, so
//! that what a device verified yesterday is what the hub offers today. Deploying sets a fleet's
//! target for the release's device type (or for every type, when the release has none) and
//! raises the fleet's deploy generation, which tells devices to forget held releases.

use drover_protocol::artifact::ArtifactFormat;
use drover_protocol::device::Module;
use serde::Serialize;
use sqlx::Row as _;
use sqlx::any::AnyRow;

use super::{Store, StoreError, StoreResult, conflict, now_ms};

/// The device-type key of a fleet target that applies to every device type.
pub const ANY_DEVICE_TYPE: &str = "*";

/// A release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Release {
    /// Database ID.
    pub id: i64,
    /// The organization.
    pub org_id: i64,
    /// The fleet.
    pub fleet_id: i64,
    /// Sequence number within the fleet, from 1 (the seed protocol's snapshot ID).
    pub seq: i64,
    /// The version, unique within the fleet.
    pub version: String,
    /// The device type it is for; `None` means any.
    pub device_type: Option<String>,
    /// The install module.
    pub module: Module,
    /// The artifact's SHA-256.
    pub sha256: String,
    /// The artifact's size in bytes.
    pub size: i64,
    /// The artifact's format.
    pub format: ArtifactFormat,
    /// The ed25519 signature over the release manifest.
    pub signature: Option<String>,
    /// Free text.
    pub notes: String,
    /// Unix milliseconds.
    pub created_at: i64,
}

/// What creating a release needs.
#[derive(Debug, Clone)]
pub struct NewRelease {
    /// The version.
    pub version: String,
    /// The device type, or `None` for any.
    pub device_type: Option<String>,
    /// The install module.
    pub module: Module,
    /// The artifact's SHA-256 (the artifact must already be stored).
    pub sha256: String,
    /// Its size.
    pub size: i64,
    /// Its format.
    pub format: ArtifactFormat,
    /// The signature.
    pub signature: Option<String>,
    /// Free text.
    pub notes: String,
}

macro_rules! release_columns {
    () => {
        "id, org_id, fleet_id, seq, version, device_type, module, \
     artifact_sha256, artifact_size, artifact_format, signature, notes, created_at"
    };
}

fn release_from_row(row: &AnyRow) -> StoreResult<Release> {
    let module: String = row.try_get("module")?;
    let format: String = row.try_get("artifact_format")?;
    Ok(Release {
        id: row.try_get("id")?,
        org_id: row.try_get("org_id")?,
        fleet_id: row.try_get("fleet_id")?,
        seq: row.try_get("seq")?,
        version: row.try_get("version")?,
        device_type: row.try_get("device_type")?,
        module: Module::parse(&module)
            .ok_or_else(|| StoreError::Corrupt(format!("release module {module:?}")))?,
        sha256: row.try_get("artifact_sha256")?,
        size: row.try_get("artifact_size")?,
        format: ArtifactFormat::parse(&format)
            .ok_or_else(|| StoreError::Corrupt(format!("artifact format {format:?}")))?,
        signature: row.try_get("signature")?,
        notes: row.try_get("notes")?,
        created_at: row.try_get("created_at")?,
    })
}

impl Store {
    /// Creates a release in a fleet, giving it the fleet's next sequence number.
    pub async fn create_release(
        &self,
        org_id: i64,
        fleet_id: i64,
        new: &NewRelease,
    ) -> StoreResult<Release> {
        let mut tx = self.begin_write().await?;
        // Taking the sequence number with an UPDATE first locks the fleet row, so two
        // concurrent creations cannot get the same number.
        let row = sqlx::query(
            "UPDATE fleets SET next_release_seq = next_release_seq + 1
             WHERE org_id = $1 AND id = $2 RETURNING next_release_seq - 1 AS seq",
        )
        .bind(org_id)
        .bind(fleet_id)
        .fetch_one(&mut *tx)
        .await?;
        let seq: i64 = row.try_get("seq")?;
        let row = sqlx::query(concat!(
            "INSERT INTO releases (org_id, fleet_id, seq, version, device_type, module,
                artifact_sha256, artifact_size, artifact_format, signature, notes, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
             RETURNING ",
            release_columns!()
        ))
        .bind(org_id)
        .bind(fleet_id)
        .bind(seq)
        .bind(&new.version)
        .bind(&new.device_type)
        .bind(new.module.as_str())
        .bind(&new.sha256)
        .bind(new.size)
        .bind(new.format.as_str())
        .bind(&new.signature)
        .bind(&new.notes)
        .bind(now_ms())
        .fetch_one(&mut *tx)
        .await
        .map_err(|e| conflict(e, format!("release {:?} in this fleet", new.version)))?;
        let release = release_from_row(&row)?;
        tx.commit().await?;
        Ok(release)
    }

    /// A fleet's releases, newest first.
    pub async fn list_releases(&self, org_id: i64, fleet_id: i64) -> StoreResult<Vec<Release>> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            release_columns!(),
            " FROM releases WHERE org_id = $1 AND fleet_id = $2
             ORDER BY seq DESC"
        ))
        .bind(org_id)
        .bind(fleet_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(release_from_row).collect()
    }

    /// A release of a fleet, by version.
    pub async fn release_by_version(
        &self,
        org_id: i64,
        fleet_id: i64,
        version: &str,
    ) -> StoreResult<Option<Release>> {
        let row = sqlx::query(concat!(
            "SELECT ",
            release_columns!(),
            " FROM releases
             WHERE org_id = $1 AND fleet_id = $2 AND version = $3"
        ))
        .bind(org_id)
        .bind(fleet_id)
        .bind(version)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(release_from_row).transpose()
    }

    /// A release of a fleet, by sequence number (seed snapshot ID).
    pub async fn release_by_seq(
        &self,
        org_id: i64,
        fleet_id: i64,
        seq: i64,
    ) -> StoreResult<Option<Release>> {
        let row = sqlx::query(concat!(
            "SELECT ",
            release_columns!(),
            " FROM releases WHERE org_id = $1 AND fleet_id = $2 AND seq = $3"
        ))
        .bind(org_id)
        .bind(fleet_id)
        .bind(seq)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(release_from_row).transpose()
    }

    /// A release by ID, within an organization.
    pub async fn release_by_id(&self, org_id: i64, id: i64) -> StoreResult<Option<Release>> {
        let row = sqlx::query(concat!(
            "SELECT ",
            release_columns!(),
            " FROM releases WHERE org_id = $1 AND id = $2"
        ))
        .bind(org_id)
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(release_from_row).transpose()
    }

    /// Whether any release of the fleet uses the artifact: a device may download an artifact
    /// only then.
    pub async fn fleet_has_artifact(
        &self,
        org_id: i64,
        fleet_id: i64,
        sha256: &str,
    ) -> StoreResult<bool> {
        let row = sqlx::query(
            "SELECT COUNT(*) AS n FROM releases
             WHERE org_id = $1 AND fleet_id = $2 AND artifact_sha256 = $3",
        )
        .bind(org_id)
        .bind(fleet_id)
        .bind(sha256)
        .fetch_one(&self.pool)
        .await?;
        Ok(row.try_get::<i64, _>("n")? > 0)
    }

    /// Makes a release the fleet's target for its device type (or for every type) and raises
    /// the fleet's deploy generation.
    pub async fn set_fleet_target(&self, org_id: i64, release: &Release) -> StoreResult<()> {
        let device_type = release.device_type.as_deref().unwrap_or(ANY_DEVICE_TYPE);
        let mut tx = self.begin_write().await?;
        sqlx::query(
            "INSERT INTO fleet_targets (fleet_id, device_type, org_id, release_id, updated_at)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (fleet_id, device_type)
             DO UPDATE SET release_id = excluded.release_id, updated_at = excluded.updated_at",
        )
        .bind(release.fleet_id)
        .bind(device_type)
        .bind(org_id)
        .bind(release.id)
        .bind(now_ms())
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE fleets SET deploy_generation = deploy_generation + 1
             WHERE org_id = $1 AND id = $2",
        )
        .bind(org_id)
        .bind(release.fleet_id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// A fleet's targets: (device type or `*`, release).
    pub async fn fleet_targets(
        &self,
        org_id: i64,
        fleet_id: i64,
    ) -> StoreResult<Vec<(String, Release)>> {
        let rows = sqlx::query(
            "SELECT t.device_type AS target_type, r.id, r.org_id, r.fleet_id, r.seq, r.version,
                r.device_type, r.module, r.artifact_sha256, r.artifact_size, r.artifact_format,
                r.signature, r.notes, r.created_at
             FROM fleet_targets t JOIN releases r ON r.id = t.release_id
             WHERE t.org_id = $1 AND t.fleet_id = $2 ORDER BY t.device_type",
        )
        .bind(org_id)
        .bind(fleet_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| Ok((row.try_get("target_type")?, release_from_row(row)?)))
            .collect()
    }

    /// The release a device of `device_type` in the fleet should run, from the fleet's targets
    /// (a target for its type wins over one for every type).
    pub async fn target_for(
        &self,
        org_id: i64,
        fleet_id: i64,
        device_type: &str,
    ) -> StoreResult<Option<Release>> {
        let targets = self.fleet_targets(org_id, fleet_id).await?;
        let specific = targets.iter().find(|(t, _)| t == device_type);
        let any = targets.iter().find(|(t, _)| t == ANY_DEVICE_TYPE);
        Ok(specific.or(any).map(|(_, r)| r.clone()))
    }

    /// Records that an organization uploaded an artifact (so that it, and only it, may make
    /// releases of it).
    pub async fn record_artifact(
        &self,
        org_id: i64,
        sha256: &str,
        size: i64,
        format: Option<ArtifactFormat>,
    ) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO artifacts (org_id, sha256, size, format, created_at)
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (org_id, sha256) DO NOTHING",
        )
        .bind(org_id)
        .bind(sha256)
        .bind(size)
        .bind(format.map(ArtifactFormat::as_str))
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// An artifact the organization uploaded: its size and format.
    pub async fn org_artifact(
        &self,
        org_id: i64,
        sha256: &str,
    ) -> StoreResult<Option<(i64, Option<ArtifactFormat>)>> {
        let row =
            sqlx::query("SELECT size, format FROM artifacts WHERE org_id = $1 AND sha256 = $2")
                .bind(org_id)
                .bind(sha256)
                .fetch_optional(&self.pool)
                .await?;
        row.map(|row| {
            let format: Option<String> = row.try_get("format")?;
            Ok((
                row.try_get("size")?,
                format.as_deref().and_then(ArtifactFormat::parse),
            ))
        })
        .transpose()
    }

    /// When a fleet's target for a device type last changed (Unix milliseconds).
    pub async fn target_updated_at(
        &self,
        org_id: i64,
        fleet_id: i64,
        device_type: &str,
    ) -> StoreResult<Option<i64>> {
        let row = sqlx::query(
            "SELECT MAX(updated_at) AS at FROM fleet_targets
             WHERE org_id = $1 AND fleet_id = $2 AND device_type IN ($3, '*')",
        )
        .bind(org_id)
        .bind(fleet_id)
        .bind(device_type)
        .fetch_one(&self.pool)
        .await?;
        Ok(row.try_get("at")?)
    }
}
