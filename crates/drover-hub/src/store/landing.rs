//! Landing, the first step of the write path (see [`super::ingest`] for the second, folding):
//! a group of checked batches is made durable, and then acknowledged.
//!
//! Each batch's sequence number is *claimed*: the batches are walked in order in memory against
//! each device's last number (a number not above it is a duplicate and changes nothing), and
//! each device's claim is written as a compare-and-set: its row moves from the last number the
//! [`Lander`] knows to the group's highest, adding the batches' bytes to the device's data use,
//! only if it still holds the known number. Each claimed batch is written as one row of
//! `landed_batches` and only if its device's claim held, so a device's claim and its rows are
//! kept or lost together. A device whose claim did not hold (another writer claimed in between)
//! is read again and its batches walked again.
//!
//! A row holds the batch as a plain batch frame: the frame it came as when it came as one (no
//! encoding at all), else its readings encoded with the quick column coder (the row lives only
//! until it is folded), split into several where the seed's JSON formats carry more than a
//! frame holds.
//!
//! The lander remembers the numbers it claimed, so a device it has seen costs no read. On
//! PostgreSQL a whole group (claims and rows) is then one statement, a single round trip and
//! one WAL flush; on SQLite it is one transaction of two statements. A batch costs two short
//! rows, whatever its size.

use std::collections::{BTreeSet, HashMap, HashSet};

use drover_protocol::batch::{self, Batch, MAX_METERS, MAX_READINGS, MAX_SERIES};
use drover_protocol::ids::DeviceId;
use drover_protocol::reading::{ClockState, Reading};
use sqlx::Any;
use sqlx::Row as _;
use sqlx::pool::PoolConnection;

use super::fold_rows::AnyQuery;
use super::ingest::{ROWS_PER_STATEMENT, numbered_placeholders, placeholders};
use super::{Engine, Store, StoreError, StoreResult, now_ms};
use crate::telemetry::fold::{IngestJob, IngestOutcome, Point, SeriesPoints};

/// Devices whose last sequence number a lander remembers; past this it forgets them all and
/// reads them again as they send (memory stays bounded on a fleet of millions).
const REMEMBERED_DEVICES: usize = 1 << 20;
/// How often a group's claims are tried before the landing fails (each retry follows another
/// writer's claim on the same device; the devices send the batches again).
const CLAIM_ROUNDS: usize = 4;
/// Bound parameters per landing statement, below both engines' limits (32766 for SQLite,
/// 65535 for PostgreSQL).
const PARAMETERS_PER_STATEMENT: usize = 30_000;
/// Columns of a claim (organization, device, known last number, new last number, bytes) and of
/// a landed row (order, organization, device, number, time, body).
const CLAIM_COLUMNS: usize = 5;
const ROW_COLUMNS: usize = 6;

type DeviceKey = (i64, String);

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

    /// Lands a group of checked batches (see the module docs): claims their sequence numbers
    /// and writes each new one to `landed_batches`. Returns each batch's outcome, in order;
    /// once this returns, the landed batches are durable. The ingest writer keeps a [`Lander`]
    /// instead, which remembers the devices' numbers between groups.
    pub async fn land_batches(&self, jobs: &[IngestJob]) -> StoreResult<Vec<IngestOutcome>> {
        Ok(Lander::new(self.clone())
            .land(jobs)
            .await?
            .into_iter()
            .map(|(outcome, _)| outcome)
            .collect())
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

    /// The devices' last batch sequence numbers, for those of `devices` that exist.
    async fn last_batch_seqs(&self, devices: &[&DeviceKey]) -> StoreResult<Vec<(DeviceKey, i64)>> {
        let mut out = Vec::with_capacity(devices.len());
        for part in devices.chunks(ROWS_PER_STATEMENT) {
            let sql = format!(
                "SELECT org_id, id, last_batch_seq FROM devices WHERE (org_id, id) IN (VALUES {})",
                placeholders(self.engine, part.len(), 2)
            );
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
            for (org, device) in part {
                query = query.bind(*org).bind(device.as_str());
            }
            for row in query.fetch_all(&self.pool).await? {
                out.push((
                    (row.try_get("org_id")?, row.try_get("id")?),
                    row.try_get("last_batch_seq")?,
                ));
            }
        }
        Ok(out)
    }

    /// Writes claims and landed rows (see the module docs): a claim moves its device from its
    /// known last number to the new one if the device still holds the known number, and a row
    /// is written if its batch has no number or its device's claim held. Every claim and row of
    /// a device is in the same statement (or transaction), so they are kept or lost together.
    /// Returns the devices whose claims held.
    async fn write_claims(
        &self,
        held_conn: &mut Option<PoolConnection<Any>>,
        claims: &[Claim],
        rows: &[LandedRow],
    ) -> StoreResult<HashSet<DeviceKey>> {
        let mut held = HashSet::new();
        let now = now_ms();
        for (claims, rows) in statement_parts(claims, rows) {
            match self.engine {
                Engine::Postgres => {
                    let conn = match held_conn {
                        Some(conn) => conn,
                        None => held_conn.insert(self.pool.acquire().await?),
                    };
                    match claim_and_land_pg(conn, claims, rows, now).await {
                        Ok(part_held) => held.extend(part_held),
                        Err(e) => {
                            // The connection may be broken: the next group takes a new one.
                            *held_conn = None;
                            return Err(e);
                        }
                    }
                }
                Engine::Sqlite => {
                    let mut tx = self.begin_write().await?;
                    let part_held = claim(self.engine, &mut tx, &claims).await?;
                    let kept: Vec<&LandedRow> = rows
                        .iter()
                        .copied()
                        .filter(|r| r.seq.is_none() || part_held.contains(&r.device))
                        .collect();
                    insert_rows(self.engine, &mut tx, &kept, now).await?;
                    tx.commit().await?;
                    held.extend(part_held);
                }
            }
        }
        Ok(held)
    }
}

/// The landing side of the ingest writer: lands groups of batches, one after another,
/// remembering each device's last claimed sequence number between them. (Landing several
/// groups at once on PostgreSQL was measured slower: more, smaller statements.)
#[derive(Debug)]
pub struct Lander {
    store: Store,
    /// (organization, device) → the last sequence number this lander claimed or read for it.
    last: HashMap<DeviceKey, i64>,
    /// On PostgreSQL, the connection the lander keeps for its statements: they differ only in
    /// how many rows they carry, so on one connection each shape is prepared once, instead of
    /// once on every connection of the pool (a round trip and a plan each time).
    conn: Option<PoolConnection<Any>>,
}

/// One device's claim in a group.
#[derive(Debug)]
struct Claim {
    device: DeviceKey,
    /// The last number the lander knows the device at; the claim holds only if it still is.
    known: i64,
    /// The group's highest new number for the device.
    last: i64,
    /// Data-use bytes of its batches in the group.
    bytes: i64,
}

/// One row to land.
#[derive(Debug)]
struct LandedRow {
    /// Its place in the group.
    order: usize,
    device: DeviceKey,
    seq: Option<i64>,
    body: Vec<u8>,
}

impl Lander {
    /// A lander over `store` that knows no device yet.
    pub fn new(store: Store) -> Lander {
        Lander {
            store,
            last: HashMap::new(),
            conn: None,
        }
    }

    /// Lands a group (see the module docs). Returns each batch's outcome and the rows it
    /// landed as, in order; once this returns, the landed batches are durable.
    pub async fn land(&mut self, jobs: &[IngestJob]) -> StoreResult<Vec<(IngestOutcome, usize)>> {
        let mut out: Vec<Option<(IngestOutcome, usize)>> = vec![None; jobs.len()];
        let mut pending: Vec<usize> = (0..jobs.len()).collect();
        for _ in 0..CLAIM_ROUNDS {
            self.learn(jobs, &pending).await?;
            let mut claims: Vec<Claim> = Vec::new();
            let mut claim_of: HashMap<DeviceKey, usize> = HashMap::new();
            let mut rows: Vec<LandedRow> = Vec::new();
            // Per pending job: its outcome if its device's claim holds (or it needs none).
            let mut planned: Vec<(usize, Option<DeviceKey>, IngestOutcome, usize)> = Vec::new();
            let mut running: HashMap<DeviceKey, i64> = HashMap::new();
            for &i in &pending {
                let job = &jobs[i];
                let key = (job.org_id, job.device.as_str().to_owned());
                let Some(seq) = job.seq else {
                    let bodies = landing_bodies(job)?;
                    planned.push((i, None, landed(job), bodies.len()));
                    for body in bodies {
                        rows.push(LandedRow {
                            order: rows.len(),
                            device: key.clone(),
                            seq: None,
                            body,
                        });
                    }
                    continue;
                };
                let seq = i64::try_from(seq).unwrap_or(i64::MAX);
                let Some(&known) = self.last.get(&key) else {
                    // Not this organization's device (or gone): nothing to store.
                    out[i] = Some((IngestOutcome::Duplicate { last_seq: 0 }, 0));
                    continue;
                };
                let current = running.entry(key.clone()).or_insert(known);
                if seq <= *current {
                    out[i] = Some((
                        IngestOutcome::Duplicate {
                            last_seq: u64::try_from(*current).unwrap_or(0),
                        },
                        0,
                    ));
                    continue;
                }
                *current = seq;
                let bytes = i64::try_from(job.bytes).unwrap_or(i64::MAX);
                match claim_of.get(&key) {
                    Some(&c) => {
                        let claim = &mut claims[c];
                        claim.last = seq;
                        claim.bytes = claim.bytes.saturating_add(bytes);
                    }
                    None => {
                        claim_of.insert(key.clone(), claims.len());
                        claims.push(Claim {
                            device: key.clone(),
                            known,
                            last: seq,
                            bytes,
                        });
                    }
                }
                let bodies = landing_bodies(job)?;
                planned.push((i, Some(key.clone()), landed(job), bodies.len()));
                for body in bodies {
                    rows.push(LandedRow {
                        order: rows.len(),
                        device: key.clone(),
                        seq: Some(seq),
                        body,
                    });
                }
            }
            let held = self
                .store
                .write_claims(&mut self.conn, &claims, &rows)
                .await?;
            for claim in claims {
                if held.contains(&claim.device) {
                    self.last.insert(claim.device, claim.last);
                } else {
                    // Another writer claimed in between: read the device again next round.
                    self.last.remove(&claim.device);
                }
            }
            pending.clear();
            for (i, device, outcome, rows) in planned {
                match device {
                    Some(device) if !held.contains(&device) => pending.push(i),
                    _ => out[i] = Some((outcome, rows)),
                }
            }
            if pending.is_empty() {
                return Ok(out
                    .into_iter()
                    .map(|o| o.unwrap_or((IngestOutcome::Duplicate { last_seq: 0 }, 0)))
                    .collect());
            }
        }
        // Batches that landed in earlier rounds stay landed: when the devices send them again
        // they are found to be duplicates, so nothing is lost or stored twice.
        Err(StoreError::Conflict(
            "batch sequence numbers claimed by another writer, again and again".into(),
        ))
    }

    /// Reads the last numbers of the pending jobs' devices that the lander does not know.
    async fn learn(&mut self, jobs: &[IngestJob], pending: &[usize]) -> StoreResult<()> {
        if self.last.len() > REMEMBERED_DEVICES {
            self.last.clear();
        }
        let mut seen = HashSet::new();
        let unknown: Vec<DeviceKey> = pending
            .iter()
            .map(|&i| &jobs[i])
            .filter(|job| job.seq.is_some())
            .map(|job| (job.org_id, job.device.as_str().to_owned()))
            .filter(|key| !self.last.contains_key(key) && seen.insert(key.clone()))
            .collect();
        if unknown.is_empty() {
            return Ok(());
        }
        let refs: Vec<&DeviceKey> = unknown.iter().collect();
        for (key, seq) in self.store.last_batch_seqs(&refs).await? {
            self.last.insert(key, seq);
        }
        Ok(())
    }
}

fn landed(job: &IngestJob) -> IngestOutcome {
    IngestOutcome::Landed {
        points: job.series.iter().map(|s| s.points.len() as u64).sum(),
    }
}

/// Splits claims and rows into statements of at most [`PARAMETERS_PER_STATEMENT`] parameters,
/// keeping each device's claim and rows together (a device's rows may make one statement
/// larger than the rest, never split).
fn statement_parts<'a>(
    claims: &'a [Claim],
    rows: &'a [LandedRow],
) -> Vec<(Vec<&'a Claim>, Vec<&'a LandedRow>)> {
    let mut rows_of: HashMap<&DeviceKey, Vec<&LandedRow>> = HashMap::new();
    let mut unclaimed: Vec<&LandedRow> = Vec::new();
    let claimed: HashSet<&DeviceKey> = claims.iter().map(|c| &c.device).collect();
    for row in rows {
        if row.seq.is_some() && claimed.contains(&row.device) {
            rows_of.entry(&row.device).or_default().push(row);
        } else {
            unclaimed.push(row);
        }
    }
    let mut parts = Vec::new();
    let mut current: (Vec<&Claim>, Vec<&LandedRow>) = (Vec::new(), Vec::new());
    let mut params = 0;
    let units = claims
        .iter()
        .map(|claim| {
            (
                Some(claim),
                rows_of.remove(&claim.device).unwrap_or_default(),
            )
        })
        .chain(unclaimed.into_iter().map(|row| (None, vec![row])));
    for (claim, rows) in units {
        let cost = claim.map_or(0, |_| CLAIM_COLUMNS) + rows.len() * ROW_COLUMNS;
        if params > 0 && params + cost > PARAMETERS_PER_STATEMENT {
            parts.push(std::mem::take(&mut current));
            params = 0;
        }
        params += cost;
        current.0.extend(claim);
        current.1.extend(rows);
    }
    if !current.0.is_empty() || !current.1.is_empty() {
        parts.push(current);
    }
    // Rows land in the order of their batches in the group.
    for (_, rows) in &mut parts {
        rows.sort_by_key(|row| row.order);
    }
    parts
}
/// A batch's landed rows: the plain frame it came as, or its readings encoded as plain batch
/// frames (quickly: the rows are kept only until folded), split where they are past a frame's
/// limits (only the seed's JSON formats, which may carry more readings or meters than a frame,
/// ever are).
fn landing_bodies(job: &IngestJob) -> StoreResult<Vec<Vec<u8>>> {
    if let Some(frame) = &job.frame {
        return Ok(vec![frame.clone()]);
    }
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
            batch::encode_quick(&Batch {
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

/// SQLite: writes `claims` as compare-and-set updates inside `tx`; returns the devices whose
/// claims held.
async fn claim(
    engine: Engine,
    tx: &mut sqlx::AnyConnection,
    claims: &[&Claim],
) -> StoreResult<HashSet<DeviceKey>> {
    let mut held = HashSet::new();
    if claims.is_empty() {
        return Ok(held);
    }
    let sql = format!(
        "UPDATE devices SET {CLAIM_SET} FROM (VALUES {}) AS v WHERE {CLAIM_WHERE}
         RETURNING org_id, id",
        placeholders(engine, claims.len(), CLAIM_COLUMNS)
    );
    let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
    for claim in claims {
        query = bind_claim(query, claim);
    }
    for row in query.fetch_all(&mut *tx).await? {
        held.insert((row.try_get("org_id")?, row.try_get("id")?));
    }
    Ok(held)
}

/// SQLite: inserts landed rows inside `tx`.
async fn insert_rows(
    engine: Engine,
    tx: &mut sqlx::AnyConnection,
    rows: &[&LandedRow],
    now: i64,
) -> StoreResult<()> {
    if rows.is_empty() {
        return Ok(());
    }
    let sql = format!(
        "INSERT INTO landed_batches (org_id, device_id, seq, landed_at, body) VALUES {}",
        placeholders(engine, rows.len(), 5)
    );
    let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
    for row in rows {
        query = query
            .bind(row.device.0)
            .bind(row.device.1.as_str())
            .bind(row.seq)
            .bind(now)
            .bind(row.body.as_slice());
    }
    query.execute(&mut *tx).await?;
    Ok(())
}

/// PostgreSQL: claims and rows in one statement (data-modifying CTEs run in the statement's
/// own transaction: one round trip, one WAL flush). The rows join the claims that held, so a
/// device's rows land exactly when its claim does, in the order given. Returns the devices
/// whose claims held.
async fn claim_and_land_pg(
    conn: &mut sqlx::AnyConnection,
    claims: Vec<&Claim>,
    rows: Vec<&LandedRow>,
    now: i64,
) -> StoreResult<HashSet<DeviceKey>> {
    let mut held = HashSet::new();
    if claims.is_empty() && rows.is_empty() {
        return Ok(held);
    }
    let claim_params = claims.len() * CLAIM_COLUMNS;
    let claimed = if claims.is_empty() {
        // Only batches without numbers (the seed's JSON): nothing to join.
        "SELECT CAST(NULL AS BIGINT) AS org_id, CAST(NULL AS TEXT) AS id WHERE FALSE".to_owned()
    } else {
        format!(
            "UPDATE devices SET {CLAIM_SET} FROM (VALUES {}) AS v WHERE {CLAIM_WHERE}
             RETURNING devices.org_id, devices.id",
            numbered_placeholders(0, claims.len(), CLAIM_COLUMNS)
        )
    };
    let landed = if rows.is_empty() {
        String::new()
    } else {
        format!(
            ", landed AS (
                INSERT INTO landed_batches (org_id, device_id, seq, landed_at, body)
                SELECT r.column2, r.column3, r.column4, r.column5, r.column6
                FROM (VALUES {}) AS r
                LEFT JOIN claimed ON claimed.org_id = r.column2 AND claimed.id = r.column3
                WHERE r.column4 IS NULL OR claimed.id IS NOT NULL
                ORDER BY r.column1)",
            numbered_placeholders(claim_params, rows.len(), ROW_COLUMNS)
        )
    };
    let sql = format!("WITH claimed AS ({claimed}){landed} SELECT org_id, id FROM claimed");
    let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
    for claim in &claims {
        query = bind_claim(query, claim);
    }
    for (order, row) in rows.iter().enumerate() {
        query = query
            .bind(i64::try_from(order).unwrap_or(i64::MAX))
            .bind(row.device.0)
            .bind(row.device.1.as_str())
            .bind(row.seq)
            .bind(now)
            .bind(row.body.as_slice());
    }
    for row in query.fetch_all(&mut *conn).await? {
        held.insert((row.try_get("org_id")?, row.try_get("id")?));
    }
    Ok(held)
}

/// The claim's update, over `v` (organization, device, known, last, bytes).
const CLAIM_SET: &str = "last_batch_seq = v.column4, telemetry_bytes = telemetry_bytes + v.column5";
/// The claim's compare-and-set condition.
const CLAIM_WHERE: &str = "devices.org_id = v.column1 AND devices.id = v.column2
    AND devices.last_batch_seq = v.column3";

fn bind_claim<'q>(query: AnyQuery<'q>, claim: &'q Claim) -> AnyQuery<'q> {
    query
        .bind(claim.device.0)
        .bind(claim.device.1.as_str())
        .bind(claim.known)
        .bind(claim.last)
        .bind(claim.bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(device: &str) -> Claim {
        Claim {
            device: (1, device.into()),
            known: 0,
            last: 1,
            bytes: 0,
        }
    }

    fn row(order: usize, device: &str, seq: Option<i64>) -> LandedRow {
        LandedRow {
            order,
            device: (1, device.into()),
            seq,
            body: Vec::new(),
        }
    }

    #[test]
    fn statements_keep_a_devices_claim_and_rows_together_within_the_limit() {
        // 6,000 devices with a batch each, two seed rows, and one device with 9 batches.
        let devices: Vec<String> = (0..6_000).map(|i| format!("d{i}")).collect();
        let mut claims: Vec<Claim> = devices.iter().map(|d| claim(d)).collect();
        claims.push(claim("busy"));
        let mut rows = Vec::new();
        rows.push(row(0, "seed", None));
        for (i, d) in devices.iter().enumerate() {
            rows.push(row(rows.len(), d, Some(1)));
            if i == 2_999 {
                for _ in 0..9 {
                    rows.push(row(rows.len(), "busy", Some(1)));
                }
                rows.push(row(rows.len(), "seed", None));
            }
        }
        let parts = statement_parts(&claims, &rows);
        assert!(parts.len() >= 2, "{} parts", parts.len());
        let mut seen_rows = 0;
        for (part_claims, part_rows) in &parts {
            let params = part_claims.len() * CLAIM_COLUMNS + part_rows.len() * ROW_COLUMNS;
            assert!(params <= PARAMETERS_PER_STATEMENT, "{params}");
            let claimed: HashSet<&DeviceKey> = part_claims.iter().map(|c| &c.device).collect();
            for r in part_rows {
                assert!(r.seq.is_none() || claimed.contains(&r.device));
            }
            assert!(part_rows.windows(2).all(|w| w[0].order < w[1].order));
            seen_rows += part_rows.len();
        }
        assert_eq!(seen_rows, rows.len());
        let busy: Vec<usize> = parts
            .iter()
            .filter(|(_, rows)| rows.iter().any(|r| r.device.1 == "busy"))
            .map(|(_, rows)| rows.iter().filter(|r| r.device.1 == "busy").count())
            .collect();
        assert_eq!(busy, [9], "one device's rows stay in one statement");
        assert_eq!(
            parts.iter().map(|(c, _)| c.len()).sum::<usize>(),
            claims.len()
        );
    }
}
