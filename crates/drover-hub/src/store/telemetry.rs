//! Series, chunks and rollups: the time-series store.
//!
//! Points are kept as compressed **chunks**, one row per series per hour, and rollups the same
//! way (one row per series per resolution per window), so that the row count — and the index
//! and per-row overhead that make row-per-point storage cost 25 bytes a point — stays small.
//!
//! [`Store::fold_batches`] writes a group of batches in one transaction: for each batch it
//! first claims its sequence number (a batch whose number is not above the device's last is a
//! duplicate and changes nothing), then merges the new points into the chunks and the rollups
//! they touch. A point whose series already holds a point at the same time is skipped (the
//! first write wins), so a resent reading is never counted twice, and the rollups only ever see
//! points that were really added.

use std::collections::HashMap;

use drover_protocol::reading::Channel;
use serde::Serialize;
use sqlx::Row as _;
use sqlx::any::AnyRow;

use super::{Store, StoreError, StoreResult, now_ms};
use crate::telemetry::chunk;
use crate::telemetry::energy::{Anomaly, step_energy};
use crate::telemetry::fold::{FoldOutcome, IngestJob, LivePoint, Point};
use crate::telemetry::rollup::{Bucket, RESOLUTIONS, Resolution, aggregate, merge_into};

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

fn series_from_row(row: &AnyRow) -> StoreResult<Series> {
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
    /// Folds a group of checked batches into the store in one transaction; see the module
    /// docs. Returns each batch's outcome, in order, and the points stored.
    pub async fn fold_batches(
        &self,
        jobs: &[IngestJob],
    ) -> StoreResult<(Vec<FoldOutcome>, Vec<LivePoint>)> {
        let mut tx = self.pool.begin().await?;
        let mut outcomes = Vec::with_capacity(jobs.len());
        let mut live = Vec::new();
        let now = now_ms();
        for job in jobs {
            if let Some(seq) = job.seq {
                let seq = i64::try_from(seq).unwrap_or(i64::MAX);
                let claimed = sqlx::query(
                    "UPDATE devices SET last_batch_seq = $1,
                        telemetry_bytes = telemetry_bytes + $2,
                        spool_dropped = CASE WHEN spool_dropped > $3 THEN spool_dropped ELSE $3 END
                     WHERE org_id = $4 AND id = $5 AND last_batch_seq < $1",
                )
                .bind(seq)
                .bind(i64::try_from(job.bytes).unwrap_or(i64::MAX))
                .bind(i64::try_from(job.spool_dropped).unwrap_or(i64::MAX))
                .bind(job.org_id)
                .bind(job.device.as_str())
                .execute(&mut *tx)
                .await?;
                if claimed.rows_affected() == 0 {
                    let last: Option<i64> = sqlx::query_scalar(
                        "SELECT last_batch_seq FROM devices WHERE org_id = $1 AND id = $2",
                    )
                    .bind(job.org_id)
                    .bind(job.device.as_str())
                    .fetch_optional(&mut *tx)
                    .await?;
                    outcomes.push(FoldOutcome::Duplicate {
                        last_seq: last.map_or(0, |s| u64::try_from(s).unwrap_or(0)),
                    });
                    continue;
                }
            }
            let mut stored = 0u64;
            let mut flagged = 0u64;
            for series_points in &job.series {
                let series = self
                    .series_for_fold(&mut tx, job, series_points, now)
                    .await?;
                let scale = i8::try_from(series.scale).unwrap_or(0);
                let points: Vec<Point> = series_points
                    .points
                    .iter()
                    .map(|p| Point {
                        value: rescale(p.value, series_points.scale, scale),
                        ..*p
                    })
                    .collect();
                let added = merge_chunks(&mut tx, &series, &points).await?;
                if added.is_empty() {
                    continue;
                }
                flagged += record_flags(&mut tx, &series, &added, now).await?;
                merge_rollups(&mut tx, &series, &added).await?;
                update_series(&mut tx, &series, &added).await?;
                stored += added.len() as u64;
                let factor = 10f64.powi(i32::from(scale));
                live.extend(added.iter().map(|p| LivePoint {
                    org_id: job.org_id,
                    series: series.id,
                    device: series.device.clone(),
                    meter: series.meter.clone(),
                    channel: series_points.channel,
                    ts: p.ts,
                    value: p.value as f64 * factor,
                }));
            }
            outcomes.push(FoldOutcome::Stored {
                points: stored,
                flags: flagged,
            });
        }
        tx.commit().await?;
        Ok((outcomes, live))
    }

    async fn series_for_fold(
        &self,
        tx: &mut sqlx::AnyConnection,
        job: &IngestJob,
        points: &crate::telemetry::fold::SeriesPoints,
        now: i64,
    ) -> StoreResult<Series> {
        sqlx::query(
            "INSERT INTO series (org_id, device_id, meter, channel, unit, scale, points, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, 0, $7)
             ON CONFLICT (device_id, meter, channel) DO NOTHING",
        )
        .bind(job.org_id)
        .bind(job.device.as_str())
        .bind(points.meter.as_str())
        .bind(points.channel.name())
        .bind(points.channel.unit().symbol())
        .bind(i64::from(points.scale))
        .bind(now)
        .execute(&mut *tx)
        .await?;
        let row = sqlx::query(concat!(
            "SELECT ",
            series_columns!(),
            " FROM series s WHERE s.device_id = $1 AND s.meter = $2 AND s.channel = $3"
        ))
        .bind(job.device.as_str())
        .bind(points.meter.as_str())
        .bind(points.channel.name())
        .fetch_one(&mut *tx)
        .await?;
        series_from_row(&row)
    }

    /// An organization's series, filtered.
    pub async fn list_series(
        &self,
        org_id: i64,
        filter: &SeriesFilter,
    ) -> StoreResult<Vec<Series>> {
        let tag = filter
            .tag
            .as_ref()
            .map(|t| format!("%\"{}\"%", t.replace(['%', '_'], "")));
        let rows = sqlx::query(concat!(
            "SELECT ",
            series_columns!(),
            " FROM series s JOIN devices d ON d.id = s.device_id AND d.org_id = s.org_id
             WHERE s.org_id = $1
               AND ($2 < 0 OR d.site_id = $2)
               AND ($3 = '' OR s.device_id = $3)
               AND ($4 = '' OR d.device_type = $4)
               AND ($5 = '' OR s.meter = $5)
               AND ($6 = '' OR s.channel = $6)
               AND ($7 = '' OR d.tags LIKE $7)
             ORDER BY s.device_id, s.meter, s.channel"
        ))
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

/// Merges points into the chunks they fall in; returns the points that were new (sorted).
async fn merge_chunks(
    tx: &mut sqlx::AnyConnection,
    series: &Series,
    points: &[Point],
) -> StoreResult<Vec<Point>> {
    let mut by_window: std::collections::BTreeMap<i64, Vec<Point>> = Default::default();
    for p in points {
        by_window
            .entry(p.ts.div_euclid(CHUNK_WINDOW_MS) * CHUNK_WINDOW_MS)
            .or_default()
            .push(*p);
    }
    let mut added = Vec::new();
    for (window, mut incoming) in by_window {
        incoming.sort_by_key(|p| p.ts);
        incoming.dedup_by_key(|p| p.ts);
        let row = sqlx::query("SELECT data FROM chunks WHERE series_id = $1 AND window_start = $2")
            .bind(series.id)
            .bind(window)
            .fetch_optional(&mut *tx)
            .await?;
        let mut existing = match row {
            Some(row) => {
                let data: Vec<u8> = row.try_get("data")?;
                chunk::decode_points(&data)?
            }
            None => Vec::new(),
        };
        let before = existing.len();
        let mut new_here = Vec::new();
        for p in incoming {
            match existing.binary_search_by_key(&p.ts, |q| q.ts) {
                Ok(_) => {}
                Err(i) => {
                    existing.insert(i, p);
                    new_here.push(p);
                }
            }
        }
        if existing.len() == before {
            continue;
        }
        let data = chunk::encode_points(&existing);
        sqlx::query(
            "INSERT INTO chunks (series_id, window_start, org_id, points, first_ts, last_ts, data)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (series_id, window_start) DO UPDATE SET
                points = excluded.points, first_ts = excluded.first_ts,
                last_ts = excluded.last_ts, data = excluded.data",
        )
        .bind(series.id)
        .bind(window)
        .bind(series.org_id)
        .bind(existing.len() as i64)
        .bind(existing.first().map_or(window, |p| p.ts))
        .bind(existing.last().map_or(window, |p| p.ts))
        .bind(data)
        .execute(&mut *tx)
        .await?;
        added.extend(new_here);
    }
    added.sort_by_key(|p| p.ts);
    Ok(added)
}

/// Flags backward steps of a cumulative register among the new points (and from the series'
/// last stored point to the first new one).
async fn record_flags(
    tx: &mut sqlx::AnyConnection,
    series: &Series,
    added: &[Point],
    now: i64,
) -> StoreResult<u64> {
    let cumulative = Channel::parse(&series.channel).is_some_and(Channel::is_cumulative);
    if !cumulative {
        return Ok(0);
    }
    let mut previous = match (series.last_ts, series.last_value) {
        (Some(ts), Some(value)) if added.first().is_some_and(|p| p.ts > ts) => Some((ts, value)),
        _ => None,
    };
    let mut flagged = 0;
    for p in added {
        if let Some((ts, value)) = previous
            && let (_, Some(kind)) = step_energy(value, p.value)
        {
            let kind = match kind {
                Anomaly::Rollover => "rollover",
                Anomaly::Reset => "reset",
                Anomaly::Backwards => "backwards",
            };
            sqlx::query(
                "INSERT INTO telemetry_flags (org_id, series_id, kind, from_ts, to_ts,
                    from_value, to_value, created_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            )
            .bind(series.org_id)
            .bind(series.id)
            .bind(kind)
            .bind(ts)
            .bind(p.ts)
            .bind(value)
            .bind(p.value)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            flagged += 1;
        }
        previous = Some((p.ts, p.value));
    }
    Ok(flagged)
}

/// Folds new points into the rollup rows they touch, at every resolution.
async fn merge_rollups(
    tx: &mut sqlx::AnyConnection,
    series: &Series,
    added: &[Point],
) -> StoreResult<()> {
    let pairs: Vec<(i64, i64)> = added.iter().map(|p| (p.ts, p.value)).collect();
    for resolution in RESOLUTIONS {
        let window_ms = rollup_window_ms(resolution);
        let mut by_window: HashMap<i64, Vec<Bucket>> = HashMap::new();
        for bucket in aggregate(&pairs, resolution) {
            by_window
                .entry(bucket.start.div_euclid(window_ms) * window_ms)
                .or_default()
                .push(bucket);
        }
        for (window, new) in by_window {
            let row = sqlx::query(
                "SELECT data FROM rollups
                 WHERE series_id = $1 AND resolution = $2 AND window_start = $3",
            )
            .bind(series.id)
            .bind(resolution.name())
            .bind(window)
            .fetch_optional(&mut *tx)
            .await?;
            let mut buckets = match row {
                Some(row) => {
                    let data: Vec<u8> = row.try_get("data")?;
                    chunk::decode_buckets(&data)?
                }
                None => Vec::new(),
            };
            merge_into(&mut buckets, &new);
            sqlx::query(
                "INSERT INTO rollups (series_id, resolution, window_start, org_id, data)
                 VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (series_id, resolution, window_start) DO UPDATE SET
                    data = excluded.data",
            )
            .bind(series.id)
            .bind(resolution.name())
            .bind(window)
            .bind(series.org_id)
            .bind(chunk::encode_buckets(&buckets))
            .execute(&mut *tx)
            .await?;
        }
    }
    Ok(())
}

async fn update_series(
    tx: &mut sqlx::AnyConnection,
    series: &Series,
    added: &[Point],
) -> StoreResult<()> {
    let (Some(first), Some(last)) = (added.first(), added.last()) else {
        return Ok(());
    };
    let newer = series.last_ts.is_none_or(|ts| last.ts > ts);
    sqlx::query(
        "UPDATE series SET
            first_ts = CASE WHEN first_ts IS NULL OR first_ts > $1 THEN $1 ELSE first_ts END,
            last_ts = CASE WHEN $2 = 1 THEN $3 ELSE last_ts END,
            last_value = CASE WHEN $2 = 1 THEN $4 ELSE last_value END,
            points = points + $5
         WHERE id = $6",
    )
    .bind(first.ts)
    .bind(i64::from(newer))
    .bind(last.ts)
    .bind(last.value)
    .bind(added.len() as i64)
    .bind(series.id)
    .execute(&mut *tx)
    .await?;
    Ok(())
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
