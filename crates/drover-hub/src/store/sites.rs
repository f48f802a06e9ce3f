//! Sites: where devices are installed (a house, a shop, a solar field), with the customer they
//! belong to and the date energy reporting started. Support staff answer "who has this box?"
//! from here; energy reports are made per meter, site or customer.
//!
//! A device's site changes are kept as a history (`site_assignments`): a box that is replaced
//! (taken off the site, its successor put on) or moved still counts for each site for the
//! time it was there, so a report on a past period does not change when boxes change later.

use drover_protocol::ids::DeviceId;
use serde::Serialize;
use sqlx::Row as _;
use sqlx::any::AnyRow;

use super::{Store, StoreResult, conflict, now_ms};

/// A site.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Site {
    /// Database ID.
    #[serde(skip)]
    pub id: i64,
    /// The organization.
    #[serde(skip)]
    pub org_id: i64,
    /// Unique name within the organization.
    pub name: String,
    /// Street address.
    pub address: String,
    /// The customer (a name or customer number).
    pub customer: String,
    /// When energy reporting started (Unix ms), for "since the reporting start" reports.
    pub reporting_start: Option<i64>,
    /// Unix ms.
    pub created_at: i64,
}

/// A new site, or the fields of a change (`None`: keep).
#[derive(Debug, Clone, Default)]
pub struct SitePatch {
    /// Street address.
    pub address: Option<String>,
    /// Customer.
    pub customer: Option<String>,
    /// Reporting start (`Some(None)` clears it).
    pub reporting_start: Option<Option<i64>>,
}

macro_rules! site_columns {
    () => {
        "id, org_id, name, address, customer, reporting_start, created_at"
    };
}

fn site_from_row(row: &AnyRow) -> StoreResult<Site> {
    Ok(Site {
        id: row.try_get("id")?,
        org_id: row.try_get("org_id")?,
        name: row.try_get("name")?,
        address: row.try_get("address")?,
        customer: row.try_get("customer")?,
        reporting_start: row.try_get("reporting_start")?,
        created_at: row.try_get("created_at")?,
    })
}

/// What [`Store::set_device_site`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SiteChange {
    /// The device is at the new site (or none) from then on.
    Done,
    /// No such device in the organization.
    NoDevice,
    /// Refused: the device's site last changed at this time (Unix ms), after the one asked.
    BeforeLast(i64),
}

/// A stretch of time a device was at a site.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteSpan {
    /// The device.
    pub device: String,
    /// From (Unix ms).
    pub from: i64,
    /// To, exclusive (`i64::MAX`: still there).
    pub to: i64,
}

impl Store {
    /// Creates a site.
    pub async fn create_site(
        &self,
        org_id: i64,
        name: &str,
        address: &str,
        customer: &str,
        reporting_start: Option<i64>,
    ) -> StoreResult<Site> {
        let row = sqlx::query(concat!(
            "INSERT INTO sites (org_id, name, address, customer, reporting_start, created_at)
             VALUES ($1, $2, $3, $4, $5, $6) RETURNING ",
            site_columns!()
        ))
        .bind(org_id)
        .bind(name)
        .bind(address)
        .bind(customer)
        .bind(reporting_start)
        .bind(now_ms())
        .fetch_one(&self.pool)
        .await
        .map_err(|e| conflict(e, format!("site {name:?}")))?;
        site_from_row(&row)
    }

    /// An organization's sites, by name; optionally only one customer's.
    pub async fn list_sites(&self, org_id: i64, customer: Option<&str>) -> StoreResult<Vec<Site>> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            site_columns!(),
            " FROM sites WHERE org_id = $1 AND ($2 = '' OR customer = $2) ORDER BY name"
        ))
        .bind(org_id)
        .bind(customer.unwrap_or(""))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(site_from_row).collect()
    }

    /// A site by name.
    pub async fn site_by_name(&self, org_id: i64, name: &str) -> StoreResult<Option<Site>> {
        let row = sqlx::query(concat!(
            "SELECT ",
            site_columns!(),
            " FROM sites WHERE org_id = $1 AND name = $2"
        ))
        .bind(org_id)
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(site_from_row).transpose()
    }

    /// A site by ID.
    pub async fn site_by_id(&self, org_id: i64, id: i64) -> StoreResult<Option<Site>> {
        let row = sqlx::query(concat!(
            "SELECT ",
            site_columns!(),
            " FROM sites WHERE org_id = $1 AND id = $2"
        ))
        .bind(org_id)
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(site_from_row).transpose()
    }

    /// Changes a site and returns it as it now is.
    pub async fn update_site(
        &self,
        org_id: i64,
        site: &Site,
        patch: &SitePatch,
    ) -> StoreResult<Site> {
        let mut updated = site.clone();
        if let Some(address) = &patch.address {
            updated.address.clone_from(address);
        }
        if let Some(customer) = &patch.customer {
            updated.customer.clone_from(customer);
        }
        if let Some(start) = patch.reporting_start {
            updated.reporting_start = start;
        }
        sqlx::query(
            "UPDATE sites SET address = $1, customer = $2, reporting_start = $3
             WHERE org_id = $4 AND id = $5",
        )
        .bind(&updated.address)
        .bind(&updated.customer)
        .bind(updated.reporting_start)
        .bind(org_id)
        .bind(site.id)
        .execute(&self.pool)
        .await?;
        Ok(updated)
    }

    /// Assigns a device to a site (or takes it off its site, with `None`) from `since` (Unix
    /// ms) on, recording the change in its site history. Without `since`, a device's first
    /// assignment holds from the beginning (its readings from before it was assigned belong to
    /// the site it was installed at) and a later one from now. A change may not start before
    /// the device's last one (history is not rewritten); one at the same instant replaces it.
    pub async fn set_device_site(
        &self,
        org_id: i64,
        device: &DeviceId,
        site_id: Option<i64>,
        since: Option<i64>,
    ) -> StoreResult<SiteChange> {
        let mut tx = self.begin_write().await?;
        let done = sqlx::query("UPDATE devices SET site_id = $1 WHERE org_id = $2 AND id = $3")
            .bind(site_id)
            .bind(org_id)
            .bind(device.as_str())
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() == 0 {
            return Ok(SiteChange::NoDevice);
        }
        let latest: Option<i64> = sqlx::query_scalar(
            "SELECT MAX(valid_from) FROM site_assignments WHERE org_id = $1 AND device_id = $2",
        )
        .bind(org_id)
        .bind(device.as_str())
        .fetch_one(&mut *tx)
        .await?;
        let since = since.unwrap_or(if latest.is_some() { now_ms() } else { 0 });
        if let Some(latest) = latest.filter(|&latest| since < latest) {
            return Ok(SiteChange::BeforeLast(latest));
        }
        sqlx::query(
            "DELETE FROM site_assignments WHERE org_id = $1 AND device_id = $2 AND valid_from = $3",
        )
        .bind(org_id)
        .bind(device.as_str())
        .bind(since)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO site_assignments (org_id, device_id, site_id, valid_from)
             VALUES ($1, $2, $3, $4)",
        )
        .bind(org_id)
        .bind(device.as_str())
        .bind(site_id)
        .bind(since)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(SiteChange::Done)
    }

    /// When each device was at a site: `(device, from, to)` spans, `to` exclusive (`i64::MAX`
    /// while it still is), in device and time order.
    pub async fn site_spans(&self, org_id: i64, site_id: i64) -> StoreResult<Vec<SiteSpan>> {
        let rows = sqlx::query(
            "SELECT device_id, site_id, valid_from FROM site_assignments
             WHERE org_id = $1 AND device_id IN
                 (SELECT device_id FROM site_assignments WHERE org_id = $1 AND site_id = $2)
             ORDER BY device_id, valid_from",
        )
        .bind(org_id)
        .bind(site_id)
        .fetch_all(&self.pool)
        .await?;
        let mut history: Vec<(String, Option<i64>, i64)> = Vec::with_capacity(rows.len());
        for row in &rows {
            history.push((
                row.try_get("device_id")?,
                row.try_get("site_id")?,
                row.try_get("valid_from")?,
            ));
        }
        let mut spans = Vec::new();
        for (i, (device, site, from)) in history.iter().enumerate() {
            if *site != Some(site_id) {
                continue;
            }
            let to = match history.get(i + 1) {
                Some((next, _, next_from)) if next == device => *next_from,
                _ => i64::MAX,
            };
            if to > *from {
                spans.push(SiteSpan {
                    device: device.clone(),
                    from: *from,
                    to,
                });
            }
        }
        Ok(spans)
    }

    /// The site a device is assigned to.
    pub async fn device_site(&self, org_id: i64, device: &DeviceId) -> StoreResult<Option<Site>> {
        let row = sqlx::query(
            "SELECT s.id, s.org_id, s.name, s.address, s.customer, s.reporting_start, s.created_at
             FROM sites s JOIN devices d ON d.site_id = s.id AND d.org_id = s.org_id
             WHERE d.org_id = $1 AND d.id = $2",
        )
        .bind(org_id)
        .bind(device.as_str())
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(site_from_row).transpose()
    }

    /// The IDs of the devices at a site.
    pub async fn site_devices(&self, org_id: i64, site_id: i64) -> StoreResult<Vec<DeviceId>> {
        let rows =
            sqlx::query("SELECT id FROM devices WHERE org_id = $1 AND site_id = $2 ORDER BY id")
                .bind(org_id)
                .bind(site_id)
                .fetch_all(&self.pool)
                .await?;
        rows.iter()
            .map(|row| {
                let id: String = row.try_get("id")?;
                DeviceId::parse(&id).map_err(|e| super::StoreError::Corrupt(e.to_string()))
            })
            .collect()
    }
}
