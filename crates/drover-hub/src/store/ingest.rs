//! The store's write path, in two steps.
//!
//! **Landing** ([`Store::land_batches`], in `landing.rs`, on the acknowledgement path): each
//! batch's sequence number is claimed and the batch written as one `landed_batches` row; the
//! batch is acknowledged once that commits.
//!
//! **Folding** ([`Store::fold_landed`], in the background and before reads): landed rows are
//! taken in the order they landed, many at a time, and folded into series, chunks and rollups
//! in one transaction that also deletes them, with a handful of multi-row statements per group:
//! 1. **Series**: the group's series are read at once; missing ones are created at once.
//! 2. **Points**: a point later than everything its series holds (the usual case: a device
//!    sends its readings in order) is new by construction, and its chunk row is *appended to*:
//!    the new points are coded as a small chunk (with the quick coder when the row already
//!    holds points, since it is re-coded later; a window's first piece is coded small) and
//!    added to the end of the row's blob, without reading or re-coding what the row holds. A point at or before its series' last
//!    time (a resend, or a meter catching up out of order) sends its whole window down the slow
//!    path: the row is read, the point is skipped if its time is already there (the first write
//!    wins, so a resent reading is never counted twice), and the row is re-coded as one chunk.
//! 3. **Rollups**: the buckets of the points really added are appended to their rollup rows the
//!    same way (buckets of one start appended separately merge exactly when read).
//! 4. A row is re-coded as one chunk when it holds [`CHUNK_MAX_PIECES`] (chunks) or
//!    [`ROLLUP_MAX_PIECES`] (rollups) pieces, and a series' previous chunk is re-coded when the
//!    series moves on to a new window, so closed windows are stored as compactly as before and
//!    the cost of a batch follows its own size, not the size of the rows it lands in.
//!
//! The rows themselves are written in `fold_rows.rs`.
//!
//! Folding many landed batches at once is what makes small batches cheap: a series' points from
//! every batch of the group go into one appended piece per row, so a device sending a batch a
//! minute costs a few row writes per fold, not per batch. Flags (cumulative registers going
//! backwards) and the series' first/last/count are worked out in memory in landing order,
//! exactly as if the batches had been stored one by one. Folds are serialized (SQLite's write
//! lock; on PostgreSQL a transaction-scoped advisory lock), so several hub replicas may fold.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use drover_protocol::batch;
use drover_protocol::ids::DeviceId;
use drover_protocol::reading::Channel;
use sqlx::Row as _;

use super::fold_rows::{count_duplicates, insert_flags, update_series};
use super::telemetry::{CHUNK_WINDOW_MS, Series, rescale, series_from_row};
use super::{Engine, Store, StoreError, StoreResult, now_ms};
use crate::telemetry::chunk;
use crate::telemetry::energy::{Anomaly, step_energy};
use crate::telemetry::fold::{
    FoldOutcome, IngestJob, IngestOutcome, LivePoint, Point, group_by_series,
};

/// An open chunk row is re-coded as one chunk once it holds this many appended pieces.
pub const CHUNK_MAX_PIECES: i64 = 32;
/// An open rollup row is re-coded as one chunk once it holds this many appended pieces.
pub const ROLLUP_MAX_PIECES: i64 = 64;
/// Rows per multi-row statement: far below both engines' limits on bound parameters (32766 for
/// SQLite, 65535 for PostgreSQL) at the widest row written here (8 columns).
pub(super) const ROWS_PER_STATEMENT: usize = 500;
/// A fold stops taking landed rows once it holds this many points (memory stays bounded when
/// catch-up batches of hours land).
const FOLD_MAX_POINTS: usize = 1_000_000;
/// The PostgreSQL advisory lock that serializes folds across hub replicas.
const FOLD_LOCK: i64 = 727_275;

/// What one fold did.
#[derive(Debug, Default)]
pub struct Folded {
    /// Landed rows folded (and deleted).
    pub rows: usize,
    /// Each folded row's outcome, in landing order.
    pub outcomes: Vec<FoldOutcome>,
    /// The points stored, for the live stream.
    pub live: Vec<LivePoint>,
    /// Rows that could not be read back; they are kept, marked with the error, and skipped.
    pub damaged: usize,
}

/// `($1, $2), ($3, $4), ...`: `rows` tuples of `columns` placeholders, numbered for PostgreSQL
/// and plain `?` for SQLite (which looks numbered ones up by name, one linear search each: a
/// quadratic cost at hundreds of parameters).
pub(super) fn placeholders(engine: Engine, rows: usize, columns: usize) -> String {
    if engine == Engine::Sqlite {
        let tuple = format!("({})", vec!["?"; columns].join(", "));
        return vec![tuple; rows].join(", ");
    }
    numbered_placeholders(0, rows, columns)
}

/// PostgreSQL's `($n, ...)` tuples for `rows` rows of `columns`, numbered from `$first + 1`
/// (for a statement that binds other parameters before them).
pub(super) fn numbered_placeholders(first: usize, rows: usize, columns: usize) -> String {
    let mut out = String::with_capacity(rows * columns * 6);
    for r in 0..rows {
        if r > 0 {
            out.push_str(", ");
        }
        out.push('(');
        for c in 0..columns {
            if c > 0 {
                out.push_str(", ");
            }
            out.push('$');
            out.push_str(&(first + r * columns + c + 1).to_string());
        }
        out.push(')');
    }
    out
}

/// The chunk window holding `ts`.
pub(super) fn window_of(ts: i64) -> i64 {
    ts.div_euclid(CHUNK_WINDOW_MS) * CHUNK_WINDOW_MS
}

/// A series being written by a group: its row as it will be after the group, and what changes.
pub(super) struct Work {
    /// The series' row, updated in memory batch by batch.
    pub(super) series: Series,
    /// Its last time before the group.
    pub(super) last_ts_before: Option<i64>,
    /// Points changed before it.
    pub(super) points_before: i64,
    /// Windows on the slow path: every point of the window, read from the row and merged.
    pub(super) slow: BTreeMap<i64, Vec<Point>>,
    /// Slow windows that gained a point.
    pub(super) slow_changed: BTreeSet<i64>,
    /// Windows on the fast path: the new points to append, in time order.
    pub(super) fresh: BTreeMap<i64, Vec<Point>>,
    /// Every point added by the group, for the rollups.
    pub(super) added: Vec<(i64, i64)>,
}

/// A backward step of a cumulative register, to be recorded.
pub(super) struct FlagRow {
    pub(super) org_id: i64,
    pub(super) series_id: i64,
    pub(super) kind: &'static str,
    pub(super) from: (i64, i64),
    pub(super) to: (i64, i64),
}

impl Store {
    /// Folds landed rows (those up to `upto` when given), oldest first, at most `max_rows` of
    /// them and about [`FOLD_MAX_POINTS`] points, into series, chunks and rollups, and deletes
    /// them, in one transaction; see the module docs. `rows == 0` means nothing was waiting.
    pub async fn fold_landed(&self, upto: Option<i64>, max_rows: usize) -> StoreResult<Folded> {
        let mut tx = self.begin_write().await?;
        if self.engine == Engine::Postgres {
            sqlx::query("SELECT pg_advisory_xact_lock($1)")
                .bind(FOLD_LOCK)
                .execute(&mut *tx)
                .await?;
        }
        let limit = i64::try_from(max_rows.max(1)).unwrap_or(i64::MAX);
        let rows = sqlx::query(
            "SELECT id, org_id, device_id, seq, body FROM landed_batches
             WHERE error IS NULL AND id <= $1 ORDER BY id LIMIT $2",
        )
        .bind(upto.unwrap_or(i64::MAX))
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        let mut ids = Vec::with_capacity(rows.len());
        let mut jobs = Vec::with_capacity(rows.len());
        let mut damaged = Vec::new();
        let mut points = 0;
        for row in rows {
            if points >= FOLD_MAX_POINTS {
                break;
            }
            let id: i64 = row.try_get("id")?;
            let body: Vec<u8> = row.try_get("body")?;
            match batch::decode(&body) {
                Ok(decoded) => {
                    points += decoded.readings.len();
                    let seq: Option<i64> = row.try_get("seq")?;
                    ids.push(id);
                    jobs.push(IngestJob {
                        org_id: row.try_get("org_id")?,
                        device: DeviceId::parse(&row.try_get::<String, _>("device_id")?)
                            .map_err(|e| StoreError::Corrupt(e.to_string()))?,
                        seq: seq.and_then(|s| u64::try_from(s).ok()),
                        series: group_by_series(decoded.readings),
                        bytes: 0,
                        frame: None,
                    });
                }
                Err(e) => {
                    tracing::error!(row = id, error = %e, "a landed batch cannot be read back; it is kept in landed_batches and skipped");
                    damaged.push((id, e.to_string()));
                }
            }
        }
        let now = now_ms();
        let (outcomes, live) = self.fold_group(&mut tx, &jobs, now).await?;
        for part in ids.chunks(ROWS_PER_STATEMENT) {
            let sql = format!(
                "DELETE FROM landed_batches WHERE id IN (VALUES {})",
                placeholders(self.engine, part.len(), 1)
            );
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
            for id in part {
                query = query.bind(*id);
            }
            query.execute(&mut *tx).await?;
        }
        for (id, error) in &damaged {
            sqlx::query("UPDATE landed_batches SET error = $1 WHERE id = $2")
                .bind(error.as_str())
                .bind(*id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(Folded {
            rows: ids.len(),
            outcomes,
            live,
            damaged: damaged.len(),
        })
    }

    /// Lands a group of batches and folds everything landed, at once: what a reader sees after
    /// the folder has caught up. Returns each batch's outcome, in order, and the points stored.
    /// The hub lands and folds separately; this serves tools and tests.
    pub async fn fold_batches(
        &self,
        jobs: &[IngestJob],
    ) -> StoreResult<(Vec<FoldOutcome>, Vec<LivePoint>)> {
        // What landed before is folded first, so that the folds below are this group's alone.
        while self.fold_landed(None, usize::MAX).await?.rows > 0 {}
        let landed = super::landing::Lander::new(self.clone()).land(jobs).await?;
        let mut folded = Vec::new();
        let mut live = Vec::new();
        loop {
            let fold = self.fold_landed(None, usize::MAX).await?;
            if fold.rows == 0 {
                break;
            }
            folded.extend(fold.outcomes);
            live.extend(fold.live);
        }
        let mut folded = folded.into_iter();
        let mut outcomes = Vec::with_capacity(jobs.len());
        for (outcome, rows) in landed {
            outcomes.push(match outcome {
                IngestOutcome::Duplicate { last_seq } => FoldOutcome::Duplicate { last_seq },
                IngestOutcome::Landed { .. } => {
                    let (mut points, mut flags) = (0, 0);
                    for fold in folded.by_ref().take(rows) {
                        if let FoldOutcome::Stored {
                            points: p,
                            flags: f,
                        } = fold
                        {
                            points += p;
                            flags += f;
                        }
                    }
                    FoldOutcome::Stored { points, flags }
                }
            });
        }
        Ok((outcomes, live))
    }

    /// Folds a group of landed batches (their sequence numbers claimed when they landed) into
    /// series, chunks and rollups, inside `tx`. Returns each batch's outcome, in order.
    async fn fold_group(
        &self,
        tx: &mut sqlx::AnyConnection,
        jobs: &[IngestJob],
        now: i64,
    ) -> StoreResult<(Vec<FoldOutcome>, Vec<LivePoint>)> {
        let mut works = self.series_for_group(&mut *tx, jobs, now).await?;
        let index_of: HashMap<(&str, &str, &str), usize> = works
            .iter()
            .enumerate()
            .map(|(i, w)| {
                (
                    (
                        w.series.device.as_str(),
                        w.series.meter.as_str(),
                        w.series.channel.as_str(),
                    ),
                    i,
                )
            })
            .collect();

        // Rescale and sort each batch's points, and find the windows that need the slow path:
        // those with a point not later than everything before it.
        let mut prepared: Vec<Vec<(usize, Channel, Vec<Point>)>> = Vec::with_capacity(jobs.len());
        let mut running: Vec<Option<i64>> = works.iter().map(|w| w.series.last_ts).collect();
        let mut slow_windows: BTreeSet<(usize, i64)> = BTreeSet::new();
        for job in jobs {
            let mut mine = Vec::new();
            for sp in &job.series {
                let key = (job.device.as_str(), sp.meter.as_str(), sp.channel.name());
                let Some(&index) = index_of.get(&key) else {
                    return Err(StoreError::Corrupt(format!(
                        "series {}/{}/{} vanished while storing a batch",
                        key.0, key.1, key.2
                    )));
                };
                let scale = i8::try_from(works[index].series.scale).unwrap_or(0);
                let mut points: Vec<Point> = sp
                    .points
                    .iter()
                    .map(|p| Point {
                        value: rescale(p.value, sp.scale, scale),
                        ..*p
                    })
                    .collect();
                points.sort_by_key(|p| p.ts);
                points.dedup_by_key(|p| p.ts);
                for p in &points {
                    match running[index] {
                        Some(last) if p.ts <= last => {
                            slow_windows.insert((index, window_of(p.ts)));
                        }
                        _ => running[index] = Some(p.ts),
                    }
                }
                mine.push((index, sp.channel, points));
            }
            prepared.push(mine);
        }
        load_slow_windows(self.engine, &mut *tx, &mut works, &slow_windows).await?;

        // Walk the batches in order, as if each were stored alone.
        let mut outcomes = Vec::with_capacity(jobs.len());
        // Per device: readings of numbered batches already stored (see `count_duplicates`).
        let mut duplicates: BTreeMap<(i64, &str), i64> = BTreeMap::new();
        let mut live = Vec::new();
        let mut flags = Vec::new();
        for (job, mine) in jobs.iter().zip(prepared) {
            let mut stored = 0u64;
            let mut flagged = 0u64;
            for (index, channel, points) in mine {
                let work = &mut works[index];
                let mut added = Vec::new();
                for p in points {
                    let window = window_of(p.ts);
                    if let Some(existing) = work.slow.get_mut(&window) {
                        if let Err(i) = existing.binary_search_by_key(&p.ts, |q| q.ts) {
                            existing.insert(i, p);
                            work.slow_changed.insert(window);
                            added.push(p);
                        }
                    } else {
                        work.fresh.entry(window).or_default().push(p);
                        added.push(p);
                    }
                }
                if added.is_empty() {
                    continue;
                }
                flagged += flag_steps(&work.series, &added, &mut flags);
                let series = &mut work.series;
                let (first, last) = (added[0], added[added.len() - 1]);
                series.first_ts = Some(series.first_ts.map_or(first.ts, |ts| ts.min(first.ts)));
                if series.last_ts.is_none_or(|ts| last.ts > ts) {
                    series.last_ts = Some(last.ts);
                    series.last_value = Some(last.value);
                }
                series.points += added.len() as i64;
                stored += added.len() as u64;
                let factor = 10f64.powi(i32::try_from(series.scale).unwrap_or(0));
                live.extend(added.iter().map(|p| LivePoint {
                    org_id: job.org_id,
                    series: series.id,
                    device: series.device.clone(),
                    meter: series.meter.clone(),
                    channel,
                    ts: p.ts,
                    value: p.value as f64 * factor,
                }));
                work.added.extend(added.iter().map(|p| (p.ts, p.value)));
            }
            outcomes.push(FoldOutcome::Stored {
                points: stored,
                flags: flagged,
            });
            let sent: usize = job.series.iter().map(|s| s.points.len()).sum();
            let skipped = (sent as u64).saturating_sub(stored);
            if job.seq.is_some() && skipped > 0 {
                *duplicates
                    .entry((job.org_id, job.device.as_str()))
                    .or_default() += i64::try_from(skipped).unwrap_or(i64::MAX);
            }
        }

        self.write_chunks(&mut *tx, &works).await?;
        self.write_rollups(&mut *tx, &works).await?;
        insert_flags(self.engine, &mut *tx, &flags, now).await?;
        update_series(self.engine, &mut *tx, &works).await?;
        count_duplicates(self.engine, &mut *tx, &duplicates).await?;
        Ok((outcomes, live))
    }

    /// The series of a group's batches, created where missing.
    async fn series_for_group(
        &self,
        tx: &mut sqlx::AnyConnection,
        jobs: &[IngestJob],
        now: i64,
    ) -> StoreResult<Vec<Work>> {
        let engine = self.engine;
        // (org, device, meter, channel, scale), in first-seen order.
        let mut wanted: Vec<(i64, String, String, Channel, i8)> = Vec::new();
        let mut seen: std::collections::HashSet<(&str, &str, Channel)> = Default::default();
        for job in jobs {
            for sp in &job.series {
                if seen.insert((job.device.as_str(), sp.meter.as_str(), sp.channel)) {
                    wanted.push((
                        job.org_id,
                        job.device.as_str().to_owned(),
                        sp.meter.as_str().to_owned(),
                        sp.channel,
                        sp.scale,
                    ));
                }
            }
        }
        let mut found = select_series(self.engine, tx, &wanted).await?;
        let have: std::collections::HashSet<(&str, &str, &str)> = found
            .iter()
            .map(|s| (s.device.as_str(), s.meter.as_str(), s.channel.as_str()))
            .collect();
        let missing: Vec<_> = wanted
            .iter()
            .filter(|(_, d, m, c, _)| !have.contains(&(d.as_str(), m.as_str(), c.name())))
            .cloned()
            .collect();
        drop(have);
        if !missing.is_empty() {
            for part in missing.chunks(ROWS_PER_STATEMENT) {
                let sql = format!(
                    "INSERT INTO series (org_id, device_id, meter, channel, unit, scale, points,
                        created_at)
                     VALUES {}
                     ON CONFLICT (device_id, meter, channel) DO NOTHING",
                    placeholders(engine, part.len(), 8)
                );
                let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
                for (org, device, meter, channel, scale) in part {
                    query = query
                        .bind(*org)
                        .bind(device.as_str())
                        .bind(meter.as_str())
                        .bind(channel.name())
                        .bind(channel.unit().symbol())
                        .bind(i64::from(*scale))
                        .bind(0i64)
                        .bind(now);
                }
                query.execute(&mut *tx).await?;
            }
            found.extend(select_series(self.engine, tx, &missing).await?);
        }
        Ok(found
            .into_iter()
            .map(|series| Work {
                last_ts_before: series.last_ts,
                points_before: series.points,
                series,
                slow: BTreeMap::new(),
                slow_changed: BTreeSet::new(),
                fresh: BTreeMap::new(),
                added: Vec::new(),
            })
            .collect())
    }
}

/// The series rows for `(org, device, meter, channel, scale)` keys, those that exist.
async fn select_series(
    engine: Engine,
    tx: &mut sqlx::AnyConnection,
    keys: &[(i64, String, String, Channel, i8)],
) -> StoreResult<Vec<Series>> {
    let mut out = Vec::with_capacity(keys.len());
    for part in keys.chunks(ROWS_PER_STATEMENT) {
        let sql = format!(
            "SELECT s.id, s.org_id, s.device_id, s.meter, s.channel, s.unit, s.scale,
                s.first_ts, s.last_ts, s.last_value, s.points
             FROM series s WHERE (s.device_id, s.meter, s.channel) IN (VALUES {})",
            placeholders(engine, part.len(), 3)
        );
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
        for (_, device, meter, channel, _) in part {
            query = query
                .bind(device.as_str())
                .bind(meter.as_str())
                .bind(channel.name());
        }
        for row in query.fetch_all(&mut *tx).await? {
            out.push(series_from_row(&row)?);
        }
    }
    Ok(out)
}

/// Reads the chunk rows of the slow-path windows, decoded, into their series' work.
async fn load_slow_windows(
    engine: Engine,
    tx: &mut sqlx::AnyConnection,
    works: &mut [Work],
    windows: &BTreeSet<(usize, i64)>,
) -> StoreResult<()> {
    let windows: Vec<(usize, i64)> = windows.iter().copied().collect();
    for part in windows.chunks(ROWS_PER_STATEMENT) {
        for &(index, window) in part {
            works[index].slow.insert(window, Vec::new());
        }
        let sql = format!(
            "SELECT series_id, window_start, data FROM chunks
             WHERE (series_id, window_start) IN (VALUES {})",
            placeholders(engine, part.len(), 2)
        );
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
        for &(index, window) in part {
            query = query.bind(works[index].series.id).bind(window);
        }
        for row in query.fetch_all(&mut *tx).await? {
            let series_id: i64 = row.try_get("series_id")?;
            let window: i64 = row.try_get("window_start")?;
            let data: Vec<u8> = row.try_get("data")?;
            if let Some(&(index, _)) = part
                .iter()
                .find(|&&(i, w)| works[i].series.id == series_id && w == window)
            {
                works[index]
                    .slow
                    .insert(window, chunk::decode_points(&data)?);
            }
        }
    }
    Ok(())
}

/// The backward steps of a cumulative register among `added` (sorted), and from the series'
/// last point to the first of them; returns how many were found.
fn flag_steps(series: &Series, added: &[Point], flags: &mut Vec<FlagRow>) -> u64 {
    let cumulative = Channel::parse(&series.channel).is_some_and(Channel::is_cumulative);
    if !cumulative {
        return 0;
    }
    let mut previous = match (series.last_ts, series.last_value) {
        (Some(ts), Some(value)) if added.first().is_some_and(|p| p.ts > ts) => Some((ts, value)),
        _ => None,
    };
    let mut found = 0;
    for p in added {
        if let Some((ts, value)) = previous
            && let (_, Some(kind)) = step_energy(value, p.value)
        {
            flags.push(FlagRow {
                org_id: series.org_id,
                series_id: series.id,
                kind: match kind {
                    Anomaly::Rollover => "rollover",
                    Anomaly::Reset => "reset",
                    Anomaly::Backwards => "backwards",
                },
                from: (ts, value),
                to: (p.ts, p.value),
            });
            found += 1;
        }
        previous = Some((p.ts, p.value));
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_number_rows_and_columns() {
        assert_eq!(
            placeholders(Engine::Postgres, 2, 3),
            "($1, $2, $3), ($4, $5, $6)"
        );
        assert_eq!(placeholders(Engine::Postgres, 1, 1), "($1)");
        assert_eq!(placeholders(Engine::Sqlite, 2, 2), "(?, ?), (?, ?)");
    }

    #[tokio::test]
    async fn a_landed_row_that_cannot_be_read_is_kept_marked_and_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_sqlite(dir.path()).await.unwrap();
        sqlx::query(
            "INSERT INTO landed_batches (org_id, device_id, seq, landed_at, body)
             VALUES (1, 'dev-x', 7, 0, $1)",
        )
        .bind(b"not a frame".as_slice())
        .execute(&store.pool)
        .await
        .unwrap();
        assert_eq!(store.landed_rows().await.unwrap(), 1);
        let folded = store.fold_landed(None, 100).await.unwrap();
        assert_eq!((folded.rows, folded.damaged), (0, 1));
        // It no longer counts as waiting, so it holds nothing up, but it is still there.
        assert_eq!(store.landed_rows().await.unwrap(), 0);
        assert_eq!(store.newest_landed().await.unwrap(), None);
        let error: String = sqlx::query_scalar("SELECT error FROM landed_batches WHERE seq = 7")
            .fetch_one(&store.pool)
            .await
            .unwrap();
        assert!(!error.is_empty());
    }

    #[test]
    fn windows_are_whole_hours_before_and_after_1970() {
        assert_eq!(window_of(3_600_000 * 5 + 7), 3_600_000 * 5);
        assert_eq!(window_of(-1), -3_600_000);
    }
}
