//! Organizations (tenants) and operators' API tokens.

use drover_protocol::ids::{TokenKind, generate_token, token_hash};
use serde::Serialize;
use sqlx::Row as _;
use sqlx::any::AnyRow;

use super::{Store, StoreResult, conflict, now_ms};

/// A tenant: everything else belongs to exactly one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Org {
    /// Database ID.
    pub id: i64,
    /// Unique name.
    pub name: String,
    /// Unix milliseconds.
    pub created_at: i64,
}

/// An operator's API token (its hash; the token itself is shown once and never stored).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ApiToken {
    /// Database ID.
    pub id: i64,
    /// The organization it acts for.
    pub org_id: i64,
    /// What it is for (`admin`, `ci`, ...).
    pub name: String,
    /// Its role; `admin` is the only one so far.
    pub role: String,
}

fn org_from_row(row: &AnyRow) -> StoreResult<Org> {
    Ok(Org {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        created_at: row.try_get("created_at")?,
    })
}

impl Store {
    /// Creates an organization.
    pub async fn create_org(&self, name: &str) -> StoreResult<Org> {
        let row = sqlx::query(
            "INSERT INTO organizations (name, created_at) VALUES ($1, $2)
             RETURNING id, name, created_at",
        )
        .bind(name)
        .bind(now_ms())
        .fetch_one(&self.pool)
        .await
        .map_err(|e| conflict(e, format!("organization {name:?}")))?;
        org_from_row(&row)
    }

    /// Finds an organization by name.
    pub async fn org_by_name(&self, name: &str) -> StoreResult<Option<Org>> {
        let row = sqlx::query("SELECT id, name, created_at FROM organizations WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(org_from_row).transpose()
    }

    /// Every organization, oldest first.
    pub async fn list_orgs(&self) -> StoreResult<Vec<Org>> {
        let rows = sqlx::query("SELECT id, name, created_at FROM organizations ORDER BY id")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(org_from_row).collect()
    }

    /// Creates an API token for an organization and returns it with the token text, which is
    /// not stored and cannot be shown again.
    pub async fn create_api_token(
        &self,
        org_id: i64,
        name: &str,
        role: &str,
    ) -> StoreResult<(ApiToken, String)> {
        let token = generate_token(TokenKind::Operator);
        let row = sqlx::query(
            "INSERT INTO api_tokens (org_id, name, token_hash, role, created_at)
             VALUES ($1, $2, $3, $4, $5) RETURNING id",
        )
        .bind(org_id)
        .bind(name)
        .bind(token_hash(&token))
        .bind(role)
        .bind(now_ms())
        .fetch_one(&self.pool)
        .await?;
        let api_token = ApiToken {
            id: row.try_get("id")?,
            org_id,
            name: name.to_string(),
            role: role.to_string(),
        };
        Ok((api_token, token))
    }

    /// Finds a live (not revoked) API token by the hash of its text.
    pub async fn api_token_by_hash(&self, hash: &str) -> StoreResult<Option<ApiToken>> {
        let row = sqlx::query(
            "SELECT id, org_id, name, role FROM api_tokens
             WHERE token_hash = $1 AND revoked_at IS NULL",
        )
        .bind(hash)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|row| {
            Ok(ApiToken {
                id: row.try_get("id")?,
                org_id: row.try_get("org_id")?,
                name: row.try_get("name")?,
                role: row.try_get("role")?,
            })
        })
        .transpose()
    }

    /// Revokes an API token of an organization. Returns whether one was revoked.
    pub async fn revoke_api_token(&self, org_id: i64, token_id: i64) -> StoreResult<bool> {
        let done = sqlx::query(
            "UPDATE api_tokens SET revoked_at = $1
             WHERE org_id = $2 AND id = $3 AND revoked_at IS NULL",
        )
        .bind(now_ms())
        .bind(org_id)
        .bind(token_id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }
}
