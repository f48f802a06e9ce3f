//! Bytes per point at rest: after the hub has acknowledged a known number of points, the bytes
//! of its raw chunks (the `chunks` table's blobs) and of its whole SQLite file, per point;
//! beside the same points stored one row per point ([`crate::rawstore`]).

use anyhow::{Context as _, bail};
use drover_protocol::batch::{self, Batch};
use sqlx::Row as _;

use crate::device;
use crate::hub::Hub;
use crate::ingest;
use crate::meter::{self, Meter};
use crate::rawstore::{self, RawSqlite};

/// The fleet the devices enrol in.
const FLEET: &str = "bench-rest";

/// What to measure.
#[derive(Debug, Clone)]
pub struct Options {
    /// Hours of data each device sends (one batch an hour).
    pub hours: u32,
    /// Devices besides the first; all send the same hours of their own meters.
    pub devices: usize,
}

/// Everything measured.
#[derive(Debug)]
pub struct Report {
    /// What was asked.
    pub options: Options,
    /// Points the hub acknowledged.
    pub points: u64,
    /// Chunk rows.
    pub chunks: u64,
    /// Bytes of chunk blobs.
    pub chunk_bytes: u64,
    /// Per channel: name, points, chunk bytes.
    pub per_channel: Vec<(String, u64, u64)>,
    /// Bytes of rollup blobs (1 minute, 1 hour, 1 day).
    pub rollup_bytes: u64,
    /// Bytes of the hub's database file (and its WAL, if one was left).
    pub hub_file_bytes: u64,
    /// Bytes of the reference's database file.
    pub raw_file_bytes: u64,
}

/// Ingests, stops the hub, and measures its file.
pub async fn run(options: Options) -> anyhow::Result<Report> {
    let work = tempfile::tempdir().context("making the hub's data directory")?;
    let data_dir = work.path().join("hub");
    let hub = Hub::start(&data_dir).await?;
    eprintln!("hub at {} (pid {})", hub.url, hub.pid());
    let provisioning_key = hub.create_fleet(FLEET, 3600).await?;
    let count = 1 + options.devices;
    let mut devices = Vec::with_capacity(count);
    for _ in 0..count {
        devices.push(device::enrol(hub.http(), &hub.url, &provisioning_key).await?);
    }
    let first_hour = meter::first_hour_ending_now(options.hours);
    let raw_path = work.path().join("raw.db");
    let raw = RawSqlite::create(&raw_path).await?;
    let mut frames = vec![Vec::new(); count];
    let mut points = 0u64;
    for (d, device) in devices.iter().enumerate() {
        let meter = Meter::new(d as u64 + 1, first_hour);
        for hour in 0..options.hours {
            let readings = meter.hour(hour);
            points += readings.len() as u64;
            raw.insert(&rawstore::rows(d, &readings)).await?;
            frames[d].push(
                batch::encode(&Batch {
                    device: device.id.clone(),
                    seq: u64::from(hour) + 1,
                    readings,
                })
                .context("encoding a batch")?,
            );
        }
    }
    eprintln!("sending {points} points from {count} devices...");
    ingest::send_all(&hub, &devices, frames).await?;
    // A query folds every landed batch into chunks and rollups before it answers.
    hub.series(devices[0].id.as_str()).await?;
    hub.stop().await?;
    raw.close().await;

    let db_path = data_dir.join("drover.db");
    let db = rawstore::open_read_only(&db_path).await?;
    let totals = sqlx::query(
        "SELECT COUNT(*) AS n, COALESCE(SUM(points), 0) AS points, \
         COALESCE(SUM(length(data)), 0) AS bytes FROM chunks",
    )
    .fetch_one(&db)
    .await
    .context("summing the hub's chunks")?;
    let stored: i64 = totals.try_get("points")?;
    if u64::try_from(stored).ok() != Some(points) {
        bail!("the hub's chunks hold {stored} points, but it acknowledged {points}");
    }
    let per_channel = sqlx::query(
        "SELECT s.channel AS channel, SUM(c.points) AS points, SUM(length(c.data)) AS bytes \
         FROM chunks c JOIN series s ON s.id = c.series_id GROUP BY s.channel ORDER BY s.channel",
    )
    .fetch_all(&db)
    .await
    .context("summing the hub's chunks per channel")?
    .iter()
    .map(|row| {
        Ok((
            row.try_get::<String, _>("channel")?,
            unsigned(row.try_get("points")?),
            unsigned(row.try_get("bytes")?),
        ))
    })
    .collect::<Result<Vec<_>, sqlx::Error>>()?;
    let rollup_bytes: i64 = sqlx::query("SELECT COALESCE(SUM(length(data)), 0) FROM rollups")
        .fetch_one(&db)
        .await
        .context("summing the hub's rollups")?
        .try_get(0)?;
    db.close().await;
    let report = Report {
        options,
        points,
        chunks: unsigned(totals.try_get("n")?),
        chunk_bytes: unsigned(totals.try_get("bytes")?),
        per_channel,
        rollup_bytes: unsigned(rollup_bytes),
        hub_file_bytes: file_bytes(&db_path)? + file_bytes(&wal_of(&db_path))?,
        raw_file_bytes: file_bytes(&raw_path)? + file_bytes(&wal_of(&raw_path))?,
    };
    eprintln!(
        "chunks {:.3} B/point, hub file {:.2} B/point, reference file {:.2} B/point",
        report.chunk_bytes as f64 / points as f64,
        report.hub_file_bytes as f64 / points as f64,
        report.raw_file_bytes as f64 / points as f64
    );
    Ok(report)
}

fn unsigned(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

fn wal_of(path: &std::path::Path) -> std::path::PathBuf {
    let mut name = path.as_os_str().to_os_string();
    name.push("-wal");
    name.into()
}

/// The size of a file, 0 if there is none.
fn file_bytes(path: &std::path::Path) -> anyhow::Result<u64> {
    match std::fs::metadata(path) {
        Ok(meta) => Ok(meta.len()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e).with_context(|| format!("reading the size of {}", path.display())),
    }
}
