//! Energy reports: what was asked for (scope, subject, period) and, once frozen, the exact
//! content that was sent to an authority, with its SHA-256, never to change again.

use serde::Serialize;
use sqlx::Row as _;
use sqlx::any::AnyRow;

use super::{Store, StoreResult, now_ms};

/// A stored report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReportRow {
    /// Its ID.
    pub id: i64,
    /// The organization.
    #[serde(skip)]
    pub org_id: i64,
    /// `meter`, `site` or `customer`.
    pub scope: String,
    /// The meter (`device/meter`), site name or customer.
    pub subject: String,
    /// Period start (Unix ms).
    pub from: i64,
    /// Period end (Unix ms, exclusive).
    pub to: i64,
    /// When it was made.
    pub created_at: i64,
    /// When it was frozen.
    pub frozen_at: Option<i64>,
    /// The frozen content (JSON text).
    #[serde(skip)]
    pub content: Option<String>,
    /// The SHA-256 of the frozen content.
    pub sha256: Option<String>,
}

macro_rules! report_columns {
    () => {
        "id, org_id, scope, subject, period_start, period_end, created_at, frozen_at, content, sha256"
    };
}

fn report_from_row(row: &AnyRow) -> StoreResult<ReportRow> {
    Ok(ReportRow {
        id: row.try_get("id")?,
        org_id: row.try_get("org_id")?,
        scope: row.try_get("scope")?,
        subject: row.try_get("subject")?,
        from: row.try_get("period_start")?,
        to: row.try_get("period_end")?,
        created_at: row.try_get("created_at")?,
        frozen_at: row.try_get("frozen_at")?,
        content: row.try_get("content")?,
        sha256: row.try_get("sha256")?,
    })
}

impl Store {
    /// Records a report's definition.
    pub async fn create_report(
        &self,
        org_id: i64,
        scope: &str,
        subject: &str,
        from: i64,
        to: i64,
    ) -> StoreResult<ReportRow> {
        let row = sqlx::query(concat!(
            "INSERT INTO reports (org_id, scope, subject, period_start, period_end, created_at)
             VALUES ($1, $2, $3, $4, $5, $6) RETURNING ",
            report_columns!()
        ))
        .bind(org_id)
        .bind(scope)
        .bind(subject)
        .bind(from)
        .bind(to)
        .bind(now_ms())
        .fetch_one(&self.pool)
        .await?;
        report_from_row(&row)
    }

    /// An organization's reports, newest first.
    pub async fn list_reports(&self, org_id: i64) -> StoreResult<Vec<ReportRow>> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            report_columns!(),
            " FROM reports WHERE org_id = $1 ORDER BY id DESC"
        ))
        .bind(org_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(report_from_row).collect()
    }

    /// One report.
    pub async fn report(&self, org_id: i64, id: i64) -> StoreResult<Option<ReportRow>> {
        let row = sqlx::query(concat!(
            "SELECT ",
            report_columns!(),
            " FROM reports WHERE org_id = $1 AND id = $2"
        ))
        .bind(org_id)
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(report_from_row).transpose()
    }

    /// Freezes a report with its content and hash. Returns false if it was already frozen
    /// (a frozen report never changes).
    pub async fn freeze_report(
        &self,
        org_id: i64,
        id: i64,
        content: &str,
        sha256: &str,
    ) -> StoreResult<bool> {
        let done = sqlx::query(
            "UPDATE reports SET frozen_at = $1, content = $2, sha256 = $3
             WHERE org_id = $4 AND id = $5 AND frozen_at IS NULL",
        )
        .bind(now_ms())
        .bind(content)
        .bind(sha256)
        .bind(org_id)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }
}
