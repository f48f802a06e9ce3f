//! Fleets: groups of devices that share a provisioning key, a release key, a config and a
//! target release per device type.

use drover_protocol::ids::{TokenKind, generate_token, random_string, token_hash};
use serde::Serialize;
use sqlx::Row as _;
use sqlx::any::AnyRow;

use super::{Store, StoreError, StoreResult, conflict, flag, json_column, now_ms};

/// A fleet.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Fleet {
    /// Database ID.
    pub id: i64,
    /// The organization it belongs to.
    pub org_id: i64,
    /// Unique within the organization.
    pub name: String,
    /// Whether new devices are accepted at once (otherwise they wait for an operator).
    pub auto_accept: bool,
    /// The release public key (`ed25519:...`) every release must be signed with.
    pub release_key: Option<String>,
    /// Seconds between device check-ins.
    pub poll_interval_s: i64,
    /// The fleet's config (a JSON object); each device's own config is merged over it.
    pub config: serde_json::Value,
    /// The secret in the seed protocol's base URL; `None` while the seed protocol is off.
    #[serde(skip)]
    pub seed_secret: Option<String>,
    /// Raised by each deploy, so that devices forget held releases.
    pub deploy_generation: i64,
    /// The sequence number (seed snapshot ID) the next release gets.
    pub next_release_seq: i64,
    /// Unix milliseconds.
    pub created_at: i64,
}

/// What creating a fleet needs.
#[derive(Debug, Clone)]
pub struct NewFleet {
    /// The fleet's name.
    pub name: String,
    /// Accept new devices at once.
    pub auto_accept: bool,
    /// The release public key.
    pub release_key: Option<String>,
    /// Seconds between check-ins.
    pub poll_interval_s: i64,
}

/// A change to a fleet's settings; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct FleetPatch {
    /// Accept new devices at once.
    pub auto_accept: Option<bool>,
    /// The release public key.
    pub release_key: Option<String>,
    /// Seconds between check-ins.
    pub poll_interval_s: Option<i64>,
    /// The fleet's config.
    pub config: Option<serde_json::Value>,
    /// Turn the seed protocol on (a new secret) or off.
    pub seed_protocol: Option<bool>,
    /// Where release numbering continues (for fleets moving from the seed hub).
    pub next_release_seq: Option<i64>,
}

macro_rules! fleet_columns {
    () => {
        "id, org_id, name, auto_accept, release_key, poll_interval_s, config, \
     seed_secret, deploy_generation, next_release_seq, created_at"
    };
}

fn fleet_from_row(row: &AnyRow) -> StoreResult<Fleet> {
    Ok(Fleet {
        id: row.try_get("id")?,
        org_id: row.try_get("org_id")?,
        name: row.try_get("name")?,
        auto_accept: flag(row, "auto_accept")?,
        release_key: row.try_get("release_key")?,
        poll_interval_s: row.try_get("poll_interval_s")?,
        config: json_column(row, "config")?,
        seed_secret: row.try_get("seed_secret")?,
        deploy_generation: row.try_get("deploy_generation")?,
        next_release_seq: row.try_get("next_release_seq")?,
        created_at: row.try_get("created_at")?,
    })
}

/// A seed-protocol secret: 32 URL-safe characters.
fn new_seed_secret() -> String {
    random_string(b"abcdefghijklmnopqrstuvwxyz0123456789", 32)
}

impl Store {
    /// Creates a fleet and returns it with its provisioning key (shown once, stored hashed).
    pub async fn create_fleet(&self, org_id: i64, new: &NewFleet) -> StoreResult<(Fleet, String)> {
        let key = generate_token(TokenKind::Provisioning);
        let row = sqlx::query(concat!(
            "INSERT INTO fleets (org_id, name, auto_accept, provisioning_key_hash, release_key,
                poll_interval_s, config, deploy_generation, next_release_seq, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, '{}', 0, 1, $7)
             RETURNING ",
            fleet_columns!()
        ))
        .bind(org_id)
        .bind(&new.name)
        .bind(i64::from(new.auto_accept))
        .bind(token_hash(&key))
        .bind(&new.release_key)
        .bind(new.poll_interval_s)
        .bind(now_ms())
        .fetch_one(&self.pool)
        .await
        .map_err(|e| conflict(e, format!("fleet {:?}", new.name)))?;
        Ok((fleet_from_row(&row)?, key))
    }

    /// An organization's fleets, by name.
    pub async fn list_fleets(&self, org_id: i64) -> StoreResult<Vec<Fleet>> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            fleet_columns!(),
            " FROM fleets WHERE org_id = $1 ORDER BY name"
        ))
        .bind(org_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(fleet_from_row).collect()
    }

    /// One fleet of an organization, by name.
    pub async fn fleet_by_name(&self, org_id: i64, name: &str) -> StoreResult<Option<Fleet>> {
        let row = sqlx::query(concat!(
            "SELECT ",
            fleet_columns!(),
            " FROM fleets WHERE org_id = $1 AND name = $2"
        ))
        .bind(org_id)
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(fleet_from_row).transpose()
    }

    /// One fleet of an organization, by ID.
    pub async fn fleet_by_id(&self, org_id: i64, id: i64) -> StoreResult<Option<Fleet>> {
        let row = sqlx::query(concat!(
            "SELECT ",
            fleet_columns!(),
            " FROM fleets WHERE org_id = $1 AND id = $2"
        ))
        .bind(org_id)
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(fleet_from_row).transpose()
    }

    /// The fleet a provisioning key belongs to.
    pub async fn fleet_by_provisioning_key(&self, key: &str) -> StoreResult<Option<Fleet>> {
        let row = sqlx::query(concat!(
            "SELECT ",
            fleet_columns!(),
            " FROM fleets WHERE provisioning_key_hash = $1"
        ))
        .bind(token_hash(key))
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(fleet_from_row).transpose()
    }

    /// The fleet a seed-protocol secret belongs to (only while its seed protocol is on).
    pub async fn fleet_by_seed_secret(&self, secret: &str) -> StoreResult<Option<Fleet>> {
        let row = sqlx::query(concat!(
            "SELECT ",
            fleet_columns!(),
            " FROM fleets WHERE seed_secret = $1"
        ))
        .bind(secret)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(fleet_from_row).transpose()
    }

    /// Changes a fleet's settings and returns the fleet as it now is.
    pub async fn update_fleet(
        &self,
        org_id: i64,
        fleet_id: i64,
        patch: &FleetPatch,
    ) -> StoreResult<Fleet> {
        let mut tx = self.begin_write().await?;
        let row = sqlx::query(concat!(
            "SELECT ",
            fleet_columns!(),
            " FROM fleets WHERE org_id = $1 AND id = $2"
        ))
        .bind(org_id)
        .bind(fleet_id)
        .fetch_one(&mut *tx)
        .await?;
        let mut fleet = fleet_from_row(&row)?;
        if let Some(v) = patch.auto_accept {
            fleet.auto_accept = v;
        }
        if let Some(v) = &patch.release_key {
            fleet.release_key = Some(v.clone());
        }
        if let Some(v) = patch.poll_interval_s {
            fleet.poll_interval_s = v;
        }
        if let Some(v) = &patch.config {
            fleet.config = v.clone();
        }
        match patch.seed_protocol {
            Some(true) if fleet.seed_secret.is_none() => {
                fleet.seed_secret = Some(new_seed_secret())
            }
            Some(false) => fleet.seed_secret = None,
            _ => {}
        }
        if let Some(next) = patch.next_release_seq {
            let row = sqlx::query(
                "SELECT COALESCE(MAX(seq), 0) AS max_seq FROM releases WHERE org_id = $1 AND fleet_id = $2",
            )
            .bind(org_id)
            .bind(fleet_id)
            .fetch_one(&mut *tx)
            .await?;
            let max_seq: i64 = row.try_get("max_seq")?;
            if next <= max_seq {
                return Err(StoreError::Conflict(format!(
                    "release sequence number {next} (the fleet's releases go up to {max_seq})"
                )));
            }
            fleet.next_release_seq = next;
        }
        sqlx::query(
            "UPDATE fleets SET auto_accept = $1, release_key = $2, poll_interval_s = $3,
                config = $4, seed_secret = $5, next_release_seq = $6
             WHERE org_id = $7 AND id = $8",
        )
        .bind(i64::from(fleet.auto_accept))
        .bind(&fleet.release_key)
        .bind(fleet.poll_interval_s)
        .bind(fleet.config.to_string())
        .bind(&fleet.seed_secret)
        .bind(fleet.next_release_seq)
        .bind(org_id)
        .bind(fleet_id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(fleet)
    }

    /// Replaces a fleet's provisioning key; the old one stops working at once.
    pub async fn rotate_provisioning_key(&self, org_id: i64, fleet_id: i64) -> StoreResult<String> {
        let key = generate_token(TokenKind::Provisioning);
        sqlx::query("UPDATE fleets SET provisioning_key_hash = $1 WHERE org_id = $2 AND id = $3")
            .bind(token_hash(&key))
            .bind(org_id)
            .bind(fleet_id)
            .execute(&self.pool)
            .await?;
        Ok(key)
    }
}
