//! The reference the data benchmarks measure the hub's store against: the same points kept the
//! way a straightforward store would keep them, one row per point, `(series_id, ts, value)`
//! with the primary key `(series_id, ts)` that a store needs to find a series' range and to
//! refuse a resent point. On SQLite the table is `WITHOUT ROWID`, so the key is the table (no
//! separate index, no rowid: the smallest row-per-point layout), with the hub's own durability
//! settings (WAL, `synchronous=FULL`). On PostgreSQL it is an ordinary table with that primary
//! key, filled with `COPY ... FROM STDIN`, the fastest bulk path the server offers.
//!
//! Both insert in large transactions ([`TX_ROWS`] rows each) and in the order the points
//! arrive at the hub: batch after batch, series after series.

use std::path::Path;
use std::str::FromStr as _;
use std::time::Duration;

use anyhow::Context as _;
use drover_protocol::reading::Reading;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{AssertSqlSafe, PgPool, SqlitePool};

use crate::meter;

/// Rows per transaction.
pub const TX_ROWS: usize = 100_000;
/// Rows per multi-row `INSERT` on SQLite (3 parameters each, well below SQLite's 32,766).
const STATEMENT_ROWS: usize = 1000;

/// One point as the reference stores it.
pub type Row = (i64, i64, i64);

/// The rows of a batch of readings from device number `device` (series `device × 3 + channel`).
pub fn rows(device: usize, readings: &[Reading]) -> Vec<Row> {
    let base = i64::try_from(device).unwrap_or(i64::MAX / 4) * meter::CHANNELS as i64;
    let mut rows: Vec<Row> = readings
        .iter()
        .map(|r| (base + meter::channel_index(r.channel), r.ts_ms, r.value))
        .collect();
    // Series after series, as the hub's bridge groups them.
    rows.sort_unstable_by_key(|&(series, ts, _)| (series, ts));
    rows
}

/// The reference on SQLite: one database file.
#[derive(Debug)]
pub struct RawSqlite {
    pool: SqlitePool,
}

impl RawSqlite {
    /// Creates the database at `path` with the points table.
    pub async fn create(path: &Path) -> anyhow::Result<RawSqlite> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full);
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options)
            .await
            .with_context(|| format!("creating the reference database {}", path.display()))?;
        sqlx::query(
            "CREATE TABLE points (series_id INTEGER NOT NULL, ts INTEGER NOT NULL, \
             value INTEGER NOT NULL, PRIMARY KEY (series_id, ts)) WITHOUT ROWID",
        )
        .execute(&pool)
        .await
        .context("creating the reference table")?;
        Ok(RawSqlite { pool })
    }

    /// Inserts `rows` in transactions of [`TX_ROWS`], with multi-row `INSERT`s.
    pub async fn insert(&self, rows: &[Row]) -> anyhow::Result<()> {
        for transaction in rows.chunks(TX_ROWS) {
            let mut tx = self.pool.begin().await.context("BEGIN (reference)")?;
            for statement in transaction.chunks(STATEMENT_ROWS) {
                let sql = format!(
                    "INSERT INTO points (series_id, ts, value) VALUES {}",
                    vec!["(?, ?, ?)"; statement.len()].join(", ")
                );
                let mut query = sqlx::query(AssertSqlSafe(sql));
                for &(series, ts, value) in statement {
                    query = query.bind(series).bind(ts).bind(value);
                }
                query
                    .execute(&mut *tx)
                    .await
                    .context("inserting into the reference table")?;
            }
            tx.commit().await.context("COMMIT (reference)")?;
        }
        Ok(())
    }

    /// "One series at 1-minute resolution" computed from the rows: the average of each minute
    /// of `[from, to)`. Returns the number of buckets.
    pub async fn minute_averages(&self, series: i64, from: i64, to: i64) -> anyhow::Result<usize> {
        let buckets: Vec<(i64, f64)> = sqlx::query_as(
            "SELECT ts / 60000 AS minute, avg(value) FROM points \
             WHERE series_id = ? AND ts >= ? AND ts < ? GROUP BY minute ORDER BY minute",
        )
        .bind(series)
        .bind(from)
        .bind(to)
        .fetch_all(&self.pool)
        .await
        .context("scanning the reference table")?;
        Ok(buckets.len())
    }

    /// Closes the database (checkpointing the WAL into the file).
    pub async fn close(self) {
        self.pool.close().await;
    }
}

/// Opens a SQLite database file read-only (to measure the hub's after it stopped).
pub async fn open_read_only(path: &Path) -> anyhow::Result<SqlitePool> {
    let options = SqliteConnectOptions::new().filename(path).read_only(true);
    SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(options)
        .await
        .with_context(|| format!("opening {} read-only", path.display()))
}

/// The reference on PostgreSQL: a table in the database the hub uses too.
#[derive(Debug)]
pub struct RawPostgres {
    pool: PgPool,
}

impl RawPostgres {
    /// Creates the table `raw_points` in the database at `url`.
    pub async fn create(url: &str) -> anyhow::Result<RawPostgres> {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(30))
            .connect(url)
            .await
            .context("connecting to PostgreSQL for the reference")?;
        sqlx::query(
            "CREATE TABLE raw_points (series_id BIGINT NOT NULL, ts BIGINT NOT NULL, \
             value BIGINT NOT NULL, PRIMARY KEY (series_id, ts))",
        )
        .execute(&pool)
        .await
        .context("creating the reference table")?;
        Ok(RawPostgres { pool })
    }

    /// Inserts `rows` in transactions of [`TX_ROWS`], one `COPY` each.
    pub async fn insert(&self, rows: &[Row]) -> anyhow::Result<()> {
        use std::fmt::Write as _;
        let mut text = String::new();
        for transaction in rows.chunks(TX_ROWS) {
            text.clear();
            for &(series, ts, value) in transaction {
                let _ = writeln!(text, "{series}\t{ts}\t{value}");
            }
            let mut tx = self.pool.begin().await.context("BEGIN (reference)")?;
            let mut copy = tx
                .copy_in_raw("COPY raw_points (series_id, ts, value) FROM STDIN")
                .await
                .context("starting COPY into the reference table")?;
            copy.send(text.as_bytes())
                .await
                .context("sending rows to COPY")?;
            copy.finish().await.context("finishing COPY")?;
            tx.commit().await.context("COMMIT (reference)")?;
        }
        Ok(())
    }

    /// Closes the connection.
    pub async fn close(self) {
        self.pool.close().await;
    }
}

/// A fresh PostgreSQL database for one run, dropped by [`ScratchDatabase::drop_now`].
#[derive(Debug)]
pub struct ScratchDatabase {
    admin: PgPool,
    name: String,
    /// Its URL.
    pub url: String,
}

impl ScratchDatabase {
    /// Creates the database `name` on the server of `server_url` (whose own database is used
    /// only to run `CREATE DATABASE`).
    pub async fn create(server_url: &str, name: &str) -> anyhow::Result<ScratchDatabase> {
        let options = sqlx::postgres::PgConnectOptions::from_str(server_url)
            .context("parsing the PostgreSQL URL")?;
        let admin = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options.clone())
            .await
            .context("connecting to PostgreSQL")?;
        sqlx::query(AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&admin)
            .await
            .with_context(|| format!("CREATE DATABASE {name}"))?;
        let url = replace_database(server_url, name);
        Ok(ScratchDatabase {
            admin,
            name: name.to_string(),
            url,
        })
    }

    /// Drops the database, closing whatever connections are left.
    pub async fn drop_now(self) -> anyhow::Result<()> {
        sqlx::query(AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        )))
        .execute(&self.admin)
        .await
        .with_context(|| format!("DROP DATABASE {}", self.name))?;
        self.admin.close().await;
        Ok(())
    }
}

/// `url` with its database name replaced (`postgres://u@h:5432/test?x=y` → `.../name?x=y`).
fn replace_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let server = match base[scheme_end..].find('/') {
        Some(i) => &base[..scheme_end + i],
        None => base,
    };
    match query {
        Some(query) => format!("{server}/{name}?{query}"),
        None => format!("{server}/{name}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_database_name_is_replaced_and_the_rest_kept() {
        assert_eq!(
            replace_database("postgres://postgres@127.0.0.1:5432/test", "b_1"),
            "postgres://postgres@127.0.0.1:5432/b_1"
        );
        assert_eq!(
            replace_database("postgres://h/test?sslmode=disable", "b"),
            "postgres://h/b?sslmode=disable"
        );
        assert_eq!(replace_database("postgres://h", "b"), "postgres://h/b");
    }
}
