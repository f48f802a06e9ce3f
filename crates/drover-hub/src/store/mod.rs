//! The hub's database: one interface, two engines.
//!
//! [`Store`] is the only code that speaks SQL. It runs on embedded SQLite (the default: one file
//! in the data directory, in WAL mode with `synchronous=FULL`, so that whatever the hub has
//! acknowledged survives a power cut) or on PostgreSQL (`--database-url postgres://...`), through
//! sqlx's runtime-selected `Any` driver. The queries are written once in the SQL both engines
//! share (`$1` placeholders, `ON CONFLICT`, `RETURNING`); see [`migrations`] for the column
//! conventions that make that possible. The conformance tests in `tests/store_conformance.rs`
//! run the same cases against both engines.
//!
//! Invariant: every method that reads or writes tenant data takes the organization's ID and
//! puts it in the `WHERE` clause, so one organization can never see another's rows. The only
//! lookups without an organization are by secrets that identify one (a credential hash, a
//! provisioning key hash, a seed secret, an API token hash).

mod attempts;
mod devices;
mod fleets;
mod fold_rows;
mod ingest;
mod landing;
pub mod migrations;
mod orgs;
mod releases;
mod reports;
mod sites;
mod telemetry;

use std::path::Path;
use std::time::Duration;

use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Connection as _, Executor as _, Row as _};

pub use attempts::{AttemptEvent, AttemptRecord};
pub use devices::{
    Device, DeviceFilter, DeviceGroup, DeviceType, NewDevice, PROTOCOL_DROVER, PROTOCOL_SEED,
    Presence, Reported, SeedCheckin,
};
pub use fleets::{Fleet, FleetPatch, NewFleet};
pub use ingest::{CHUNK_MAX_PIECES, ROLLUP_MAX_PIECES};
pub use landing::Lander;
pub use orgs::{ApiToken, Org};
pub use releases::{NewRelease, Release};
pub use reports::ReportRow;
pub use sites::{Site, SiteChange, SitePatch, SiteSpan};
pub use telemetry::{
    CHUNK_WINDOW_MS, Series, SeriesFilter, StoredRow, rescale, rollup_window_ms, unscale,
};

/// Which database engine a [`Store`] runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// Embedded SQLite.
    Sqlite,
    /// PostgreSQL.
    Postgres,
}

/// Errors from the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database refused or failed a query.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// The database URL names an engine Drover does not support.
    #[error("unsupported database URL {0:?}: use postgres://... or leave it unset for SQLite")]
    UnsupportedUrl(String),
    /// The database was migrated by a newer hub.
    #[error(
        "the database schema is at version {found}, newer than this hub understands ({known}); run a newer drover"
    )]
    SchemaTooNew {
        /// The version in the database.
        found: i64,
        /// The newest version this binary knows.
        known: i64,
    },
    /// A row broke a rule the schema cannot express (bad JSON in a column, say).
    #[error("corrupt row: {0}")]
    Corrupt(String),
    /// A unique name or key is already taken.
    #[error("{0} already exists")]
    Conflict(String),
}

/// A pooled connection idle at least this long is checked before it is used again.
const IDLE_CHECK: Duration = Duration::from_secs(30);

/// Shorthand for store results.
pub type StoreResult<T> = Result<T, StoreError>;

/// The hub's database.
#[derive(Clone, Debug)]
pub struct Store {
    pool: AnyPool,
    engine: Engine,
}

impl Store {
    /// Opens (creating if needed) the SQLite database `drover.db` in `data_dir`.
    pub async fn open_sqlite(data_dir: &Path) -> StoreResult<Store> {
        let url = format!("sqlite://{}?mode=rwc", data_dir.join("drover.db").display());
        Store::connect(&url).await
    }

    /// Connects to `url` (`sqlite://...` or `postgres://...`) and applies pending migrations.
    pub async fn connect(url: &str) -> StoreResult<Store> {
        sqlx::any::install_default_drivers();
        let engine = if url.starts_with("sqlite:") {
            Engine::Sqlite
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Engine::Postgres
        } else {
            return Err(StoreError::UnsupportedUrl(redact_url(url)));
        };
        // A connection is checked (a round trip) only when it has been idle a while: checking
        // each one as it is taken would add a round trip to every statement, and a connection
        // that broke while busy fails its statement either way.
        let options = AnyPoolOptions::new()
            .acquire_timeout(Duration::from_secs(30))
            .test_before_acquire(false)
            .before_acquire(|conn, meta| {
                Box::pin(async move {
                    if meta.idle_for >= IDLE_CHECK {
                        conn.ping().await?;
                    }
                    Ok(true)
                })
            });
        let pool = match engine {
            // SQLite takes one writer at a time; a few connections let reads go on beside it.
            Engine::Sqlite => {
                options
                    .max_connections(4)
                    .after_connect(|conn, _meta| {
                        Box::pin(async move {
                            conn.execute(
                                "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; \
                                 PRAGMA foreign_keys = ON; PRAGMA busy_timeout = 10000;",
                            )
                            .await?;
                            Ok(())
                        })
                    })
                    .connect(url)
                    .await?
            }
            Engine::Postgres => options.max_connections(16).connect(url).await?,
        };
        let store = Store { pool, engine };
        store.migrate().await?;
        Ok(store)
    }

    /// Begins a transaction that will write. On SQLite it takes the write lock up front
    /// (`BEGIN IMMEDIATE`): a deferred transaction that reads and then writes is refused busy,
    /// without waiting, when another connection wrote in between.
    pub(crate) async fn begin_write(&self) -> StoreResult<sqlx::Transaction<'static, sqlx::Any>> {
        Ok(match self.engine {
            Engine::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await?,
            Engine::Postgres => self.pool.begin().await?,
        })
    }

    /// The engine this store runs on.
    pub fn engine(&self) -> Engine {
        self.engine
    }

    /// The schema version the database is at.
    pub async fn schema_version(&self) -> StoreResult<i64> {
        let row = sqlx::query("SELECT COALESCE(MAX(version), 0) AS v FROM schema_migrations")
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get("v")?)
    }

    async fn migrate(&self) -> StoreResult<()> {
        let mut conn = self.pool.acquire().await?;
        if self.engine == Engine::Postgres {
            // Replicas starting together queue here; the first migrates, the rest find it done.
            conn.execute("SELECT pg_advisory_lock(727274)").await?;
        }
        let result = self.migrate_locked(&mut conn).await;
        if self.engine == Engine::Postgres {
            conn.execute("SELECT pg_advisory_unlock(727274)").await?;
        }
        result
    }

    async fn migrate_locked(&self, conn: &mut sqlx::AnyConnection) -> StoreResult<()> {
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                version BIGINT PRIMARY KEY,
                name TEXT NOT NULL,
                applied_at BIGINT NOT NULL
            )",
        )
        .await?;
        let row = sqlx::query("SELECT COALESCE(MAX(version), 0) AS v FROM schema_migrations")
            .fetch_one(&mut *conn)
            .await?;
        let current: i64 = row.try_get("v")?;
        let known = migrations::MIGRATIONS.last().map_or(0, |m| m.version);
        if current > known {
            return Err(StoreError::SchemaTooNew {
                found: current,
                known,
            });
        }
        for migration in migrations::MIGRATIONS
            .iter()
            .filter(|m| m.version > current)
        {
            let mut tx = sqlx::Connection::begin(&mut *conn).await?;
            // The SQL comes from the compiled-in migration list, never from input.
            sqlx::raw_sql(sqlx::AssertSqlSafe(migration.sql(self.engine)))
                .execute(&mut *tx)
                .await?;
            sqlx::query(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES ($1, $2, $3)",
            )
            .bind(migration.version)
            .bind(migration.name)
            .bind(now_ms())
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            tracing::info!(
                version = migration.version,
                name = migration.name,
                "applied migration"
            );
        }
        Ok(())
    }

    /// Closes the pool, waiting for connections to finish.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// The current time in Unix milliseconds.
pub fn now_ms() -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(now.as_millis()).unwrap_or(i64::MAX)
}

/// A URL with any password replaced, for error messages and logs.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            match userinfo.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &url[..scheme_end + 3],
                    &userinfo[..colon],
                    &url[at..]
                ),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// Maps a unique-constraint violation to [`StoreError::Conflict`] naming `what`.
fn conflict(err: sqlx::Error, what: impl Into<String>) -> StoreError {
    match &err {
        sqlx::Error::Database(db) if db.is_unique_violation() => StoreError::Conflict(what.into()),
        _ => StoreError::Database(err),
    }
}

fn json_column<T: serde::de::DeserializeOwned>(row: &AnyRow, column: &str) -> StoreResult<T> {
    let text: String = row.try_get(column)?;
    serde_json::from_str(&text).map_err(|e| StoreError::Corrupt(format!("{column}: {e}")))
}

fn flag(row: &AnyRow, column: &str) -> StoreResult<bool> {
    Ok(row.try_get::<i64, _>(column)? != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted_from_urls() {
        assert_eq!(
            redact_url("postgres://drover:hunter2@db:5432/drover"),
            "postgres://drover:***@db:5432/drover"
        );
        assert_eq!(
            redact_url("postgres://db:5432/drover"),
            "postgres://db:5432/drover"
        );
    }
}
