//! Landing, the first step of the write path (see [`super::ingest`] for the second, folding):
//! a group of checked batches is made durable in one transaction, and then acknowledged.
//!
//! Per group, each batch's sequence number is claimed: the devices' last numbers are read at
//! once, the batches are walked in order in memory (a number not above the device's last is a
//! duplicate and changes nothing), and the claimed numbers are written back at once, with the
//! devices' data-use bytes and spool drops. Each claimed batch is written as one row of
//! `landed_batches`: its readings as a plain batch frame (split into several where the seed's
//! JSON formats carry more than a frame holds). A batch costs two short rows, whatever its size.

use std::collections::{BTreeSet, HashMap};

use drover_protocol::batch::{self, Batch, MAX_METERS, MAX_READINGS, MAX_SERIES};
use drover_protocol::ids::DeviceId;
use drover_protocol::reading::{ClockState, Reading};
use sqlx::Row as _;

use super::ingest::{ROWS_PER_STATEMENT, placeholders};
use super::{Engine, Store, StoreError, StoreResult, now_ms};
use crate::telemetry::fold::{FoldOutcome, IngestJob, IngestOutcome, Point, SeriesPoints};

impl Store {
    /// The highest batch sequence number stored for a device (0 when none, or no such device).
    pub async fn last_batch_seq(&self, org_id: i64, device: &DeviceId) -> StoreResult<u64> {
        let row = sqlx::query("SELECT last_batch_seq FROM devices WHERE org_id = $1 AND id = $2")
            .bind(org_id)
            .bind(device.as_str())
            .fetch_optional(&self.pool)
            .await?;
        let last: i64 = match row {
            Some(row) => row.try_get("last_batch_seq")?,
            None => 0,
        };
        Ok(u64::try_from(last).unwrap_or(0))
    }

    /// Lands a group of checked batches in one transaction (see the module docs): claims their
    /// sequence numbers and writes each new one to `landed_batches`. Returns each batch's
    /// outcome, in order; once this returns, the landed batches are durable.
    pub async fn land_batches(&self, jobs: &[IngestJob]) -> StoreResult<Vec<IngestOutcome>> {
        Ok(self
            .land(jobs)
            .await?
            .into_iter()
            .map(|(outcome, _)| outcome)
            .collect())
    }

    /// [`Store::land_batches`], also giving the rows each batch landed as.
    pub(super) async fn land(
        &self,
        jobs: &[IngestJob],
    ) -> StoreResult<Vec<(IngestOutcome, usize)>> {
        let mut tx = self.begin_write().await?;
        let now = now_ms();
        let claims = claim(self.engine, &mut tx, jobs).await?;
        let mut rows: Vec<(&IngestJob, Vec<u8>)> = Vec::with_capacity(jobs.len());
        let mut out = Vec::with_capacity(jobs.len());
        for (job, claim) in jobs.iter().zip(&claims) {
            match claim {
                Some(FoldOutcome::Duplicate { last_seq }) => out.push((
                    IngestOutcome::Duplicate {
                        last_seq: *last_seq,
                    },
                    0,
                )),
                _ => {
                    let bodies = landing_bodies(job)?;
                    let points = job.series.iter().map(|s| s.points.len() as u64).sum();
                    out.push((IngestOutcome::Landed { points }, bodies.len()));
                    rows.extend(bodies.into_iter().map(|body| (job, body)));
                }
            }
        }
        for part in rows.chunks(ROWS_PER_STATEMENT) {
            let sql = format!(
                "INSERT INTO landed_batches (org_id, device_id, seq, landed_at, body) VALUES {}",
                placeholders(self.engine, part.len(), 5)
            );
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
            for (job, body) in part {
                query = query
                    .bind(job.org_id)
                    .bind(job.device.as_str())
                    .bind(job.seq.map(|s| i64::try_from(s).unwrap_or(i64::MAX)))
                    .bind(now)
                    .bind(body.as_slice());
            }
            query.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(out)
    }

    /// The newest landed row not yet folded (`None` when every landed batch is folded).
    pub async fn newest_landed(&self) -> StoreResult<Option<i64>> {
        Ok(sqlx::query_scalar(
            "SELECT id FROM landed_batches WHERE error IS NULL ORDER BY id DESC LIMIT 1",
        )
        .fetch_optional(&self.pool)
        .await?)
    }

    /// How many landed rows wait to be folded.
    pub async fn landed_rows(&self) -> StoreResult<usize> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM landed_batches WHERE error IS NULL")
            .fetch_one(&self.pool)
            .await?;
        Ok(usize::try_from(n).unwrap_or(0))
    }
}

/// Claims each batch's sequence number, in order; `None` for a batch to store, the duplicate
/// outcome for one that is not.
async fn claim(
    engine: Engine,
    tx: &mut sqlx::AnyConnection,
    jobs: &[IngestJob],
) -> StoreResult<Vec<Option<FoldOutcome>>> {
    let mut devices: Vec<(i64, &str)> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for job in jobs {
        if job.seq.is_some() && seen.insert((job.org_id, job.device.as_str())) {
            devices.push((job.org_id, job.device.as_str()));
        }
    }
    if devices.is_empty() {
        return Ok(vec![None; jobs.len()]);
    }
    let mut last: HashMap<(i64, String), i64> = HashMap::new();
    for part in devices.chunks(ROWS_PER_STATEMENT) {
        let sql = format!(
            "SELECT org_id, id, last_batch_seq FROM devices WHERE (org_id, id) IN (VALUES {})",
            placeholders(engine, part.len(), 2)
        );
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
        for (org, device) in part {
            query = query.bind(*org).bind(*device);
        }
        for row in query.fetch_all(&mut *tx).await? {
            last.insert(
                (row.try_get("org_id")?, row.try_get("id")?),
                row.try_get("last_batch_seq")?,
            );
        }
    }
    // (org, device) → (new last seq, bytes to add, spool drops), in first-claimed order.
    let mut updates: Vec<((i64, String), i64, i64, i64)> = Vec::new();
    let mut update_of: HashMap<(i64, String), usize> = HashMap::new();
    let mut out = Vec::with_capacity(jobs.len());
    for job in jobs {
        let Some(seq) = job.seq else {
            out.push(None);
            continue;
        };
        let seq = i64::try_from(seq).unwrap_or(i64::MAX);
        let key = (job.org_id, job.device.as_str().to_owned());
        match last.get_mut(&key) {
            Some(current) if seq > *current => {
                *current = seq;
                let bytes = i64::try_from(job.bytes).unwrap_or(i64::MAX);
                let dropped = i64::try_from(job.spool_dropped).unwrap_or(i64::MAX);
                match update_of.get(&key) {
                    Some(&i) => {
                        let u = &mut updates[i];
                        u.1 = seq;
                        u.2 = u.2.saturating_add(bytes);
                        u.3 = u.3.max(dropped);
                    }
                    None => {
                        update_of.insert(key.clone(), updates.len());
                        updates.push((key, seq, bytes, dropped));
                    }
                }
                out.push(None);
            }
            Some(current) => out.push(Some(FoldOutcome::Duplicate {
                last_seq: u64::try_from(*current).unwrap_or(0),
            })),
            // Not this organization's device (or gone): nothing to store.
            None => out.push(Some(FoldOutcome::Duplicate { last_seq: 0 })),
        }
    }
    let mut updated = 0u64;
    for part in updates.chunks(ROWS_PER_STATEMENT) {
        let sql = format!(
            "UPDATE devices SET last_batch_seq = v.column3,
                telemetry_bytes = telemetry_bytes + v.column4,
                spool_dropped = CASE WHEN spool_dropped > v.column5 THEN spool_dropped
                                     ELSE v.column5 END
             FROM (VALUES {}) AS v
             WHERE devices.org_id = v.column1 AND devices.id = v.column2
               AND devices.last_batch_seq < v.column3",
            placeholders(engine, part.len(), 5)
        );
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
        for ((org, device), seq, bytes, dropped) in part {
            query = query
                .bind(*org)
                .bind(device.as_str())
                .bind(*seq)
                .bind(*bytes)
                .bind(*dropped);
        }
        updated += query.execute(&mut *tx).await?.rows_affected();
    }
    if updated != updates.len() as u64 {
        // Another writer claimed numbers in between; nothing of this group is kept, and the
        // devices send again.
        return Err(StoreError::Conflict(
            "a batch sequence number claimed by another writer".into(),
        ));
    }
    Ok(out)
}

/// A batch's landed rows: its readings as plain batch frames, split where they are past a
/// frame's limits (only the seed's JSON formats, which may carry more readings or meters than a
/// frame, ever are).
fn landing_bodies(job: &IngestJob) -> StoreResult<Vec<Vec<u8>>> {
    let mut parts: Vec<Vec<Reading>> = Vec::new();
    let mut current: Vec<Reading> = Vec::new();
    let (mut series, mut meters) = (0, BTreeSet::new());
    for sp in &job.series {
        for points in sp.points.chunks(MAX_READINGS) {
            let new_meter = !meters.contains(sp.meter.as_str());
            if current.len() + points.len() > MAX_READINGS
                || series + 1 > MAX_SERIES
                || (new_meter && meters.len() + 1 > MAX_METERS)
            {
                parts.push(std::mem::take(&mut current));
                series = 0;
                meters.clear();
            }
            series += 1;
            meters.insert(sp.meter.as_str());
            current.extend(points.iter().map(|p| reading(sp, p)));
        }
    }
    if !current.is_empty() || parts.is_empty() {
        parts.push(current);
    }
    parts
        .into_iter()
        .map(|readings| {
            batch::encode(&Batch {
                device: job.device.clone(),
                seq: job.seq.unwrap_or(0),
                readings,
            })
            .map_err(|e| StoreError::Corrupt(format!("a checked batch cannot be landed: {e}")))
        })
        .collect()
}

fn reading(series: &SeriesPoints, point: &Point) -> Reading {
    Reading {
        meter: series.meter.clone(),
        channel: series.channel,
        ts_ms: point.ts,
        value: point.value,
        scale: series.scale,
        clock: ClockState::from_code(point.clock).unwrap_or(ClockState::Unknown),
    }
}
