//! Series, chunks and rollups: the time-series store.
//!
//! Points are kept as compressed **chunks**, one row per series per hour, and rollups the same
//! way (one row per series per resolution per window), so that the row count — and the index
//! and per-row overhead that make row-per-point storage cost 25 bytes a point — stays small.
//!
//! This module reads; [`super::ingest`] holds the write path ([`Store::fold_batches`]), which
//! appends new points to the open rows instead of re-coding them, so a row's blob may hold
//! several chunks back to back (see [`crate::telemetry::chunk`]).

use serde::Serialize;
use sqlx::Row as _;
use sqlx::any::AnyRow;

use super::{Engine, Store, StoreError, StoreResult};
use crate::telemetry::chunk;
use crate::telemetry::energy::{Anomaly, step_energy};
use crate::telemetry::fold::Point;
use crate::telemetry::rollup::{Bucket, Resolution};

/// How much time one chunk row holds.
pub const CHUNK_WINDOW_MS: i64 = 3_600_000;

/// How much time one rollup row holds, per resolution: a day of minutes, 30 days of hours,
/// 1000 days of days.
pub fn rollup_window_ms(resolution: Resolution) -> i64 {
    match resolution {
        Resolution::Minute => 86_400_000,
        Resolution::Hour => 30 * 86_400_000,
        Resolution::Day => 1000 * 86_400_000,
    }
}

/// A series: one channel of one meter of one device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Series {
    /// Database ID.
    pub id: i64,
    /// The organization.
    #[serde(skip)]
    pub org_id: i64,
    /// The device.
    pub device: String,
    /// The meter.
    pub meter: String,
    /// The channel.
    pub channel: String,
    /// The unit.
    pub unit: String,
    /// Values are stored as `value × 10^scale`.
    pub scale: i64,
    /// First point (Unix ms).
    pub first_ts: Option<i64>,
    /// Last point.
    pub last_ts: Option<i64>,
    /// Value of the last point (scaled).
    pub last_value: Option<i64>,
    /// Points stored.
    pub points: i64,
}

/// One stored row of a series' chunks or rollups, for diagnostics and tests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StoredRow {
    /// Start of the row's window (Unix ms).
    pub window_start: i64,
    /// Chunks appended to the row since it was last coded as one.
    pub pieces: i64,
    /// Size of the row's blob.
    pub bytes: i64,
}

/// Filters for listing series; `None` matches everything.
#[derive(Debug, Clone, Default)]
pub struct SeriesFilter {
    /// Only devices at this site.
    pub site_id: Option<i64>,
    /// Only this device.
    pub device: Option<String>,
    /// Only devices of this type.
    pub device_type: Option<String>,
    /// Only this meter.
    pub meter: Option<String>,
    /// Only this channel.
    pub channel: Option<String>,
    /// Only devices reporting this tag.
    pub tag: Option<String>,
}

macro_rules! series_columns {
    () => {
        "s.id, s.org_id, s.device_id, s.meter, s.channel, s.unit, s.scale, s.first_ts, \
         s.last_ts, s.last_value, s.points"
    };
}

pub(super) fn series_from_row(row: &AnyRow) -> StoreResult<Series> {
    Ok(Series {
        id: row.try_get("id")?,
        org_id: row.try_get("org_id")?,
        device: row.try_get("device_id")?,
        meter: row.try_get("meter")?,
        channel: row.try_get("channel")?,
        unit: row.try_get("unit")?,
        scale: row.try_get("scale")?,
        first_ts: row.try_get("first_ts")?,
        last_ts: row.try_get("last_ts")?,
        last_value: row.try_get("last_value")?,
        points: row.try_get("points")?,
    })
}

/// A value stored as `value × 10^scale`, in its unit: divided by an exact power of ten for a
/// negative scale (so that 12345 at scale -2 is the `f64` nearest 123.45, with none of the
/// error a multiplication by 0.01 adds).
pub fn unscale(value: i128, scale: i64) -> f64 {
    let power = 10f64.powi(i32::try_from(scale.unsigned_abs()).unwrap_or(i32::MAX));
    if scale < 0 {
        value as f64 / power
    } else {
        value as f64 * power
    }
}

/// Rescales a value from one decimal exponent to another (rounding when it gets coarser).
pub fn rescale(value: i64, from: i8, to: i8) -> i64 {
    let diff = i32::from(from) - i32::from(to);
    match diff {
        0 => value,
        d if d > 0 => value.saturating_mul(10i64.saturating_pow(d.unsigned_abs())),
        d => {
            let div = 10i64.saturating_pow(d.unsigned_abs());
            (value as f64 / div as f64).round() as i64
        }
    }
}

impl Store {
    /// An organization's series, filtered.
    pub async fn list_series(
        &self,
        org_id: i64,
        filter: &SeriesFilter,
    ) -> StoreResult<Vec<Series>> {
        // Tags are stored as a JSON array: look for the tag as a JSON string, an exact,
        // case-sensitive substring (LIKE would take a tag's `_` for a wildcard, and SQLite's
        // LIKE ignores case).
        let tag = filter
            .tag
            .as_ref()
            .map(|t| serde_json::to_string(t).unwrap_or_default());
        let contains = match self.engine {
            Engine::Sqlite => "instr(d.tags, $7) > 0",
            Engine::Postgres => "strpos(d.tags, $7) > 0",
        };
        let sql = format!(
            "SELECT {} FROM series s JOIN devices d ON d.id = s.device_id AND d.org_id = s.org_id
             WHERE s.org_id = $1
               AND ($2 < 0 OR d.site_id = $2)
               AND ($3 = '' OR s.device_id = $3)
               AND ($4 = '' OR d.device_type = $4)
               AND ($5 = '' OR s.meter = $5)
               AND ($6 = '' OR s.channel = $6)
               AND ($7 = '' OR {contains})
             ORDER BY s.device_id, s.meter, s.channel",
            series_columns!()
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(org_id)
            .bind(filter.site_id.unwrap_or(-1))
            .bind(filter.device.as_deref().unwrap_or(""))
            .bind(filter.device_type.as_deref().unwrap_or(""))
            .bind(filter.meter.as_deref().unwrap_or(""))
            .bind(filter.channel.as_deref().unwrap_or(""))
            .bind(tag.as_deref().unwrap_or(""))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(series_from_row).collect()
    }

    /// One series of an organization.
    pub async fn series_by_id(&self, org_id: i64, id: i64) -> StoreResult<Option<Series>> {
        let row = sqlx::query(concat!(
            "SELECT ",
            series_columns!(),
            " FROM series s WHERE s.org_id = $1 AND s.id = $2"
        ))
        .bind(org_id)
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(series_from_row).transpose()
    }

    /// The raw points of a series in `[from, to)`, sorted by time.
    pub async fn points(
        &self,
        org_id: i64,
        series: i64,
        from: i64,
        to: i64,
    ) -> StoreResult<Vec<Point>> {
        let rows = sqlx::query(
            "SELECT data FROM chunks
             WHERE org_id = $1 AND series_id = $2 AND window_start > $3 AND window_start < $4
             ORDER BY window_start",
        )
        .bind(org_id)
        .bind(series)
        .bind(from - CHUNK_WINDOW_MS)
        .bind(to)
        .fetch_all(&self.pool)
        .await?;
        let mut points = Vec::new();
        for row in rows {
            let data: Vec<u8> = row.try_get("data")?;
            points.extend(
                chunk::decode_points(&data)?
                    .into_iter()
                    .filter(|p| p.ts >= from && p.ts < to),
            );
        }
        Ok(points)
    }

    /// The rollup buckets of a series in `[from, to)` at a resolution, sorted by start.
    pub async fn buckets(
        &self,
        org_id: i64,
        series: i64,
        resolution: Resolution,
        from: i64,
        to: i64,
    ) -> StoreResult<Vec<Bucket>> {
        let window = rollup_window_ms(resolution);
        let rows = sqlx::query(
            "SELECT data FROM rollups
             WHERE org_id = $1 AND series_id = $2 AND resolution = $3
               AND window_start > $4 AND window_start < $5
             ORDER BY window_start",
        )
        .bind(org_id)
        .bind(series)
        .bind(resolution.name())
        .bind(from - window)
        .bind(to)
        .fetch_all(&self.pool)
        .await?;
        let mut buckets = Vec::new();
        for row in rows {
            let data: Vec<u8> = row.try_get("data")?;
            buckets.extend(
                chunk::decode_buckets(&data)?
                    .into_iter()
                    .filter(|b| b.start >= from && b.start < to),
            );
        }
        Ok(buckets)
    }

    /// The last point of a series before `ts`, looking back at most `lookback` ms.
    pub async fn point_before(
        &self,
        org_id: i64,
        series: i64,
        ts: i64,
        lookback: i64,
    ) -> StoreResult<Option<Point>> {
        let rows = sqlx::query(
            "SELECT data FROM chunks
             WHERE org_id = $1 AND series_id = $2 AND window_start < $3 AND window_start > $4
             ORDER BY window_start DESC LIMIT 2",
        )
        .bind(org_id)
        .bind(series)
        .bind(ts)
        .bind(ts - lookback - CHUNK_WINDOW_MS)
        .fetch_all(&self.pool)
        .await?;
        for row in rows {
            let data: Vec<u8> = row.try_get("data")?;
            if let Some(p) = chunk::decode_points(&data)?
                .into_iter()
                .rev()
                .find(|p| p.ts < ts)
            {
                return Ok(Some(p));
            }
        }
        Ok(None)
    }

    /// The chunk rows (resolution `None`) or rollup rows of a series, oldest first.
    pub async fn stored_rows(
        &self,
        org_id: i64,
        series: i64,
        resolution: Option<Resolution>,
    ) -> StoreResult<Vec<StoredRow>> {
        let rows = match resolution {
            None => {
                sqlx::query(
                    "SELECT window_start, blocks, CAST(length(data) AS BIGINT) AS bytes
                     FROM chunks WHERE org_id = $1 AND series_id = $2 ORDER BY window_start",
                )
                .bind(org_id)
                .bind(series)
                .fetch_all(&self.pool)
                .await?
            }
            Some(r) => {
                sqlx::query(
                    "SELECT window_start, blocks, CAST(length(data) AS BIGINT) AS bytes
                     FROM rollups WHERE org_id = $1 AND series_id = $2 AND resolution = $3
                     ORDER BY window_start",
                )
                .bind(org_id)
                .bind(series)
                .bind(r.name())
                .fetch_all(&self.pool)
                .await?
            }
        };
        rows.iter()
            .map(|row| {
                Ok(StoredRow {
                    window_start: row.try_get("window_start")?,
                    pieces: row.try_get("blocks")?,
                    bytes: row.try_get("bytes")?,
                })
            })
            .collect()
    }

    /// Deletes chunks (resolution `None`) or rollups older than `before` (Unix ms); returns how
    /// many rows went.
    pub async fn delete_older_than(
        &self,
        resolution: Option<Resolution>,
        before: i64,
    ) -> StoreResult<u64> {
        let done = match resolution {
            None => {
                sqlx::query("DELETE FROM chunks WHERE window_start + $1 <= $2")
                    .bind(CHUNK_WINDOW_MS)
                    .bind(before)
                    .execute(&self.pool)
                    .await?
            }
            Some(r) => {
                sqlx::query("DELETE FROM rollups WHERE resolution = $1 AND window_start + $2 <= $3")
                    .bind(r.name())
                    .bind(rollup_window_ms(r))
                    .bind(before)
                    .execute(&self.pool)
                    .await?
            }
        };
        Ok(done.rows_affected())
    }

    /// Bytes of chunk data (and rows), for the at-rest figure.
    pub async fn chunk_bytes(&self) -> StoreResult<(i64, i64, i64)> {
        let row = sqlx::query(
            "SELECT COUNT(*) AS n, CAST(COALESCE(SUM(points), 0) AS BIGINT) AS points FROM chunks",
        )
        .fetch_one(&self.pool)
        .await?;
        let n: i64 = row.try_get("n")?;
        let points: i64 = row.try_get("points")?;
        let mut bytes = 0i64;
        for row in sqlx::query("SELECT data FROM chunks")
            .fetch_all(&self.pool)
            .await?
        {
            let data: Vec<u8> = row.try_get("data")?;
            bytes += data.len() as i64;
        }
        Ok((n, points, bytes))
    }

    /// Flags recorded for a series in `[from, to)`.
    pub async fn flags(
        &self,
        org_id: i64,
        series: i64,
        from: i64,
        to: i64,
    ) -> StoreResult<Vec<crate::telemetry::energy::Flag>> {
        let rows = sqlx::query(
            "SELECT kind, from_ts, to_ts, from_value, to_value FROM telemetry_flags
             WHERE org_id = $1 AND series_id = $2 AND to_ts >= $3 AND from_ts < $4
             ORDER BY to_ts",
        )
        .bind(org_id)
        .bind(series)
        .bind(from)
        .bind(to)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let kind: String = row.try_get("kind")?;
                let kind = match kind.as_str() {
                    "rollover" => Anomaly::Rollover,
                    "reset" => Anomaly::Reset,
                    "backwards" => Anomaly::Backwards,
                    other => return Err(StoreError::Corrupt(format!("flag kind {other:?}"))),
                };
                let from_value: i64 = row.try_get("from_value")?;
                let to_value: i64 = row.try_get("to_value")?;
                Ok(crate::telemetry::energy::Flag {
                    kind,
                    from_ts: row.try_get("from_ts")?,
                    to_ts: row.try_get("to_ts")?,
                    from_value,
                    to_value,
                    counted: step_energy(from_value, to_value).0,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rescaling_is_exact_when_finer_and_rounds_when_coarser() {
        assert_eq!(rescale(12, 0, -1), 120);
        assert_eq!(rescale(125, -1, 0), 13);
        assert_eq!(rescale(7, 2, 2), 7);
    }
}
