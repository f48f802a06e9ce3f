//! Writing what a fold worked out (see [`super::ingest`]): chunk pieces appended to open rows or
//! rows replaced, rows re-coded when they grew too many pieces or their window closed, rollup
//! pieces, flags, the series' new first/last/count, and the devices' duplicate counts, each as
//! a few multi-row statements per group.

use std::collections::{BTreeMap, BTreeSet};

use sqlx::Row as _;

use super::ingest::{
    CHUNK_MAX_PIECES, FlagRow, ROLLUP_MAX_PIECES, ROWS_PER_STATEMENT, Work, placeholders, window_of,
};
use super::telemetry::{Series, rollup_window_ms};
use super::{Engine, Store, StoreResult};
use crate::telemetry::chunk;
use crate::telemetry::fold::Point;
use crate::telemetry::rollup::{RESOLUTIONS, aggregate};

/// A chunk or rollup row to write.
struct BlobRow {
    series_id: i64,
    org_id: i64,
    /// `None` for chunks, the resolution's name for rollups.
    resolution: Option<&'static str>,
    window_start: i64,
    points: i64,
    first_ts: i64,
    last_ts: i64,
    data: Vec<u8>,
}

impl Store {
    /// Appends fast-path points, rewrites slow-path windows, and re-codes the rows that grew
    /// too many pieces or whose window is over.
    pub(super) async fn write_chunks(
        &self,
        tx: &mut sqlx::AnyConnection,
        works: &[Work],
    ) -> StoreResult<()> {
        let engine = self.engine;
        let mut appends = Vec::new();
        let mut rewrites = Vec::new();
        let mut recode: BTreeSet<(i64, i64)> = BTreeSet::new();
        for work in works {
            let s = &work.series;
            let open_before = work.last_ts_before.map(window_of);
            for (&window, points) in &work.fresh {
                // A piece appended to a row that already holds points is re-coded with the row
                // (at CHUNK_MAX_PIECES, or when its window closes), so it is coded quickly now.
                // A window's first piece may stay its only one, so it is coded small.
                let coding = if open_before == Some(window) {
                    chunk::encode_points_quick
                } else {
                    chunk::encode_points
                };
                appends.push(points_row(s, window, points, coding));
            }
            for &window in &work.slow_changed {
                rewrites.push(points_row(
                    s,
                    window,
                    &work.slow[&window],
                    chunk::encode_points,
                ));
            }
            // The series moved on to a new window: its previous one is over.
            if let Some(before) = work.last_ts_before.map(window_of)
                && work.fresh.keys().any(|&w| w > before)
            {
                recode.insert((s.id, before));
            }
        }
        for (series_id, window_start, pieces) in self.append_rows(tx, &appends).await? {
            if pieces >= CHUNK_MAX_PIECES {
                recode.insert((series_id, window_start));
            }
        }
        replace_rows(self.engine, tx, &rewrites).await?;
        let recode: Vec<(i64, i64)> = recode.into_iter().collect();
        let mut recoded = Vec::new();
        for part in recode.chunks(ROWS_PER_STATEMENT) {
            let sql = format!(
                "SELECT series_id, window_start, org_id, data FROM chunks
                 WHERE blocks > 1 AND (series_id, window_start) IN (VALUES {})",
                placeholders(engine, part.len(), 2)
            );
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
            for (series_id, window_start) in part {
                query = query.bind(*series_id).bind(*window_start);
            }
            for row in query.fetch_all(&mut *tx).await? {
                let data: Vec<u8> = row.try_get("data")?;
                let points = chunk::decode_points(&data)?;
                let (Some(first), Some(last)) = (points.first(), points.last()) else {
                    continue;
                };
                recoded.push(BlobRow {
                    series_id: row.try_get("series_id")?,
                    org_id: row.try_get("org_id")?,
                    resolution: None,
                    window_start: row.try_get("window_start")?,
                    points: points.len() as i64,
                    first_ts: first.ts,
                    last_ts: last.ts,
                    data: chunk::encode_points(&points),
                });
            }
        }
        replace_rows(self.engine, tx, &recoded).await
    }

    /// Appends the buckets of the added points to their rollup rows, and re-codes the rows that
    /// grew too many pieces.
    pub(super) async fn write_rollups(
        &self,
        tx: &mut sqlx::AnyConnection,
        works: &[Work],
    ) -> StoreResult<()> {
        let engine = self.engine;
        let mut appends = Vec::new();
        for work in works {
            if work.added.is_empty() {
                continue;
            }
            for resolution in RESOLUTIONS {
                let window_ms = rollup_window_ms(resolution);
                let mut by_window: BTreeMap<i64, Vec<_>> = BTreeMap::new();
                for bucket in aggregate(&work.added, resolution) {
                    by_window
                        .entry(bucket.start.div_euclid(window_ms) * window_ms)
                        .or_default()
                        .push(bucket);
                }
                for (window_start, buckets) in by_window {
                    appends.push(BlobRow {
                        series_id: work.series.id,
                        org_id: work.series.org_id,
                        resolution: Some(resolution.name()),
                        window_start,
                        points: 0,
                        first_ts: 0,
                        last_ts: 0,
                        data: chunk::encode_buckets(&buckets),
                    });
                }
            }
        }
        let mut recode = Vec::new();
        for part in appends.chunks(ROWS_PER_STATEMENT) {
            let sql = format!(
                "INSERT INTO rollups (series_id, resolution, window_start, org_id, data, blocks)
                 VALUES {}
                 ON CONFLICT (series_id, resolution, window_start) DO UPDATE SET
                    data = CAST(rollups.data || excluded.data AS {}),
                    blocks = rollups.blocks + 1
                 RETURNING series_id, resolution, window_start, blocks",
                placeholders(engine, part.len(), 6),
                self.blob_type()
            );
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
            for row in part {
                query = query
                    .bind(row.series_id)
                    .bind(row.resolution.unwrap_or_default())
                    .bind(row.window_start)
                    .bind(row.org_id)
                    .bind(row.data.as_slice())
                    .bind(1i64);
            }
            for row in query.fetch_all(&mut *tx).await? {
                let pieces: i64 = row.try_get("blocks")?;
                if pieces >= ROLLUP_MAX_PIECES {
                    recode.push((
                        row.try_get::<i64, _>("series_id")?,
                        row.try_get::<String, _>("resolution")?,
                        row.try_get::<i64, _>("window_start")?,
                    ));
                }
            }
        }
        for (series_id, resolution, window_start) in recode {
            let data: Vec<u8> = sqlx::query_scalar(
                "SELECT data FROM rollups
                 WHERE series_id = $1 AND resolution = $2 AND window_start = $3",
            )
            .bind(series_id)
            .bind(resolution.as_str())
            .bind(window_start)
            .fetch_one(&mut *tx)
            .await?;
            let buckets = chunk::decode_buckets(&data)?;
            sqlx::query(
                "UPDATE rollups SET data = $1, blocks = 1
                 WHERE series_id = $2 AND resolution = $3 AND window_start = $4",
            )
            .bind(chunk::encode_buckets(&buckets))
            .bind(series_id)
            .bind(resolution.as_str())
            .bind(window_start)
            .execute(&mut *tx)
            .await?;
        }
        Ok(())
    }

    /// Appends pieces to chunk rows (creating rows that do not exist); returns each row's
    /// `(series, window, pieces)` afterwards.
    async fn append_rows(
        &self,
        tx: &mut sqlx::AnyConnection,
        rows: &[BlobRow],
    ) -> StoreResult<Vec<(i64, i64, i64)>> {
        let engine = self.engine;
        let mut out = Vec::with_capacity(rows.len());
        for part in rows.chunks(ROWS_PER_STATEMENT) {
            // Every appended point is later than what the row holds, so `first_ts` stays and
            // `last_ts` is the piece's.
            let sql = format!(
                "INSERT INTO chunks (series_id, window_start, org_id, points, first_ts, last_ts,
                    data, blocks)
                 VALUES {}
                 ON CONFLICT (series_id, window_start) DO UPDATE SET
                    points = chunks.points + excluded.points,
                    last_ts = excluded.last_ts,
                    data = CAST(chunks.data || excluded.data AS {}),
                    blocks = chunks.blocks + 1
                 RETURNING series_id, window_start, blocks",
                placeholders(engine, part.len(), 8),
                self.blob_type()
            );
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
            for row in part {
                query = bind_chunk_row(query, row);
            }
            for row in query.fetch_all(&mut *tx).await? {
                out.push((
                    row.try_get("series_id")?,
                    row.try_get("window_start")?,
                    row.try_get("blocks")?,
                ));
            }
        }
        Ok(out)
    }

    /// The engine's name for a binary column type.
    fn blob_type(&self) -> &'static str {
        match self.engine {
            Engine::Sqlite => "BLOB",
            Engine::Postgres => "BYTEA",
        }
    }
}

/// Adds to each device's count of readings that came in numbered batches and were stored
/// already. A resent batch keeps its number and is dropped whole when it lands, so such
/// readings mean a device sent readings again under a new number: harmless to the data (the
/// first write wins), but a sign of an agent bug that tests and operators should see. (The
/// seed's JSON formats, which have no numbers, resend by design and are not counted.)
pub(super) async fn count_duplicates(
    engine: Engine,
    tx: &mut sqlx::AnyConnection,
    duplicates: &BTreeMap<(i64, &str), i64>,
) -> StoreResult<()> {
    let counts: Vec<_> = duplicates.iter().collect();
    for part in counts.chunks(ROWS_PER_STATEMENT) {
        let sql = format!(
            "UPDATE devices SET duplicate_points = duplicate_points + v.column3
             FROM (VALUES {}) AS v
             WHERE devices.org_id = v.column1 AND devices.id = v.column2",
            placeholders(engine, part.len(), 3)
        );
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
        for ((org, device), n) in part {
            query = query.bind(*org).bind(*device).bind(**n);
        }
        query.execute(&mut *tx).await?;
    }
    Ok(())
}

fn points_row(
    series: &Series,
    window_start: i64,
    points: &[Point],
    coding: fn(&[Point]) -> Vec<u8>,
) -> BlobRow {
    BlobRow {
        series_id: series.id,
        org_id: series.org_id,
        resolution: None,
        window_start,
        points: points.len() as i64,
        first_ts: points.first().map_or(window_start, |p| p.ts),
        last_ts: points.last().map_or(window_start, |p| p.ts),
        data: coding(points),
    }
}

pub(super) type AnyQuery<'q> = sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments>;

fn bind_chunk_row<'q>(query: AnyQuery<'q>, row: &BlobRow) -> AnyQuery<'q> {
    query
        .bind(row.series_id)
        .bind(row.window_start)
        .bind(row.org_id)
        .bind(row.points)
        .bind(row.first_ts)
        .bind(row.last_ts)
        .bind(row.data.as_slice())
        .bind(1i64)
}

/// Writes whole chunk rows (one piece each), replacing what was there.
async fn replace_rows(
    engine: Engine,
    tx: &mut sqlx::AnyConnection,
    rows: &[BlobRow],
) -> StoreResult<()> {
    for part in rows.chunks(ROWS_PER_STATEMENT) {
        let sql = format!(
            "INSERT INTO chunks (series_id, window_start, org_id, points, first_ts, last_ts,
                data, blocks)
             VALUES {}
             ON CONFLICT (series_id, window_start) DO UPDATE SET
                points = excluded.points, first_ts = excluded.first_ts,
                last_ts = excluded.last_ts, data = excluded.data, blocks = excluded.blocks",
            placeholders(engine, part.len(), 8)
        );
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
        for row in part {
            query = bind_chunk_row(query, row);
        }
        query.execute(&mut *tx).await?;
    }
    Ok(())
}

pub(super) async fn insert_flags(
    engine: Engine,
    tx: &mut sqlx::AnyConnection,
    flags: &[FlagRow],
    now: i64,
) -> StoreResult<()> {
    for part in flags.chunks(ROWS_PER_STATEMENT) {
        let sql = format!(
            "INSERT INTO telemetry_flags (org_id, series_id, kind, from_ts, to_ts, from_value,
                to_value, created_at)
             VALUES {}",
            placeholders(engine, part.len(), 8)
        );
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
        for flag in part {
            query = query
                .bind(flag.org_id)
                .bind(flag.series_id)
                .bind(flag.kind)
                .bind(flag.from.0)
                .bind(flag.to.0)
                .bind(flag.from.1)
                .bind(flag.to.1)
                .bind(now);
        }
        query.execute(&mut *tx).await?;
    }
    Ok(())
}

/// Writes each changed series' first and last point and adds its new points to its count.
pub(super) async fn update_series(
    engine: Engine,
    tx: &mut sqlx::AnyConnection,
    works: &[Work],
) -> StoreResult<()> {
    let changed: Vec<&Work> = works.iter().filter(|w| !w.added.is_empty()).collect();
    for part in changed.chunks(ROWS_PER_STATEMENT) {
        let sql = format!(
            "UPDATE series SET first_ts = v.column2, last_ts = v.column3,
                last_value = v.column4, points = series.points + v.column5
             FROM (VALUES {}) AS v
             WHERE series.id = v.column1",
            placeholders(engine, part.len(), 5)
        );
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
        for work in part {
            let s = &work.series;
            query = query
                .bind(s.id)
                .bind(s.first_ts.unwrap_or_default())
                .bind(s.last_ts.unwrap_or_default())
                .bind(s.last_value.unwrap_or_default())
                .bind(s.points - work.points_before);
        }
        query.execute(&mut *tx).await?;
    }
    Ok(())
}
