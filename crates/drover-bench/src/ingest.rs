//! Durable ingest, end to end: how many points per second the hub acknowledges when many
//! devices send telemetry batches at once, beside the same points inserted one row per point
//! into the same database engine (see [`crate::rawstore`]), measured in the same run.
//!
//! A `204` from `POST /device/v1/batches` means the batch is committed (the writer folds many
//! batches into one transaction), so acknowledged points per second is durable throughput.
//! Every batch is built and encoded before the clock starts; each device sends its batches one
//! after another on its own keep-alive connection, as the agent's sender does, and a `503`
//! (queue full) is retried after `Retry-After` with the same sequence number.

use std::time::Instant;

use anyhow::{Context as _, bail};
use drover_protocol::batch::{self, Batch};
use tokio::task::JoinSet;

use crate::device::{self, EnrolledDevice};
use crate::hub::{Hub, HubOptions};
use crate::meter::{self, Meter};
use crate::rawstore::{self, RawPostgres, RawSqlite, Row};
use crate::{checkin, machine, procfs};

/// The fleet the simulated devices enrol in.
const FLEET: &str = "bench-ingest";

/// What to measure.
#[derive(Debug, Clone)]
pub struct Options {
    /// The loads, each measured on every engine.
    pub loads: Vec<Load>,
    /// Measured runs per load and engine.
    pub runs: usize,
    /// A PostgreSQL server to measure too (any database on it; a scratch one is made).
    pub postgres_url: Option<String>,
}

/// One load: how many devices send how many batches of how many minutes of data per run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Load {
    /// Devices sending at once, each on its own connection.
    pub devices: usize,
    /// Batches each device sends per measured run.
    pub batches: u32,
    /// Minutes of meter data per batch (a divisor of 60).
    pub minutes: u32,
}

impl Load {
    /// Parses `DEVICESxBATCHESxMINUTES`, such as `128x4x60`.
    pub fn parse(text: &str) -> anyhow::Result<Load> {
        let bad = || {
            anyhow::anyhow!(
                "an ingest load is DEVICESxBATCHESxMINUTES (such as 128x4x60), not {text:?}"
            )
        };
        let parts: Vec<&str> = text.split('x').collect();
        let [devices, batches, minutes] = parts[..] else {
            return Err(bad());
        };
        let load = Load {
            devices: devices.parse().map_err(|_| bad())?,
            batches: batches.parse().map_err(|_| bad())?,
            minutes: minutes.parse().map_err(|_| bad())?,
        };
        anyhow::ensure!(
            load.devices > 0 && load.batches > 0,
            "an ingest load needs at least one device and one batch: {text:?}"
        );
        anyhow::ensure!(
            load.minutes > 0 && 60 % load.minutes == 0,
            "the minutes per batch must divide 60 (1, 2, 5, 10, 15, 30, 60, ...): {text:?}"
        );
        Ok(load)
    }

    /// Points in one batch.
    pub fn points_per_batch(&self) -> usize {
        meter::POLLS_PER_HOUR * meter::CHANNELS * self.minutes as usize / 60
    }

    /// Points every device together sends in one run.
    pub fn points_per_run(&self) -> u64 {
        (self.devices * self.batches as usize * self.points_per_batch()) as u64
    }
}

impl std::fmt::Display for Load {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}x{}x{}", self.devices, self.batches, self.minutes)
    }
}

/// Everything measured.
#[derive(Debug)]
pub struct Report {
    /// What was asked.
    pub options: Options,
    /// The runs of each load on each engine.
    pub engines: Vec<EngineRuns>,
    /// Why PostgreSQL was not measured, if it was not.
    pub postgres_skipped: Option<String>,
}

/// The runs of one load on one engine.
#[derive(Debug)]
pub struct EngineRuns {
    /// `SQLite` or `PostgreSQL`.
    pub engine: &'static str,
    /// The load.
    pub load: Load,
    /// Mean encoded batch size, in bytes.
    pub mean_frame_bytes: f64,
    /// The load average (1 min) before and after.
    pub load_average: (String, String),
    /// Each measured run.
    pub runs: Vec<Run>,
}

/// One measured run: the hub and the reference, back to back.
#[derive(Debug, Clone)]
pub struct Run {
    /// Whether the hub went first.
    pub hub_first: bool,
    /// Points the hub acknowledged per second.
    pub hub_points_per_sec: f64,
    /// Points per second until a query had them all: from the first batch sent until the
    /// query that follows the last acknowledgement (which folds every landed batch) answered.
    pub hub_queryable_points_per_sec: f64,
    /// Points per second into the one-row-per-point reference.
    pub raw_points_per_sec: f64,
    /// CPU time of the hub process per point, in nanoseconds, until the points were queryable
    /// (folding included).
    pub hub_cpu_ns_per_point: f64,
    /// CPU time of this process (sqlx and SQLite's work) per point of the reference, in
    /// nanoseconds; PostgreSQL's server processes are not counted.
    pub raw_cpu_ns_per_point: f64,
    /// Batches refused with `503` (and sent again).
    pub retries: u64,
}

/// Runs each load on SQLite and, when a URL is given, on PostgreSQL.
pub async fn run(options: Options) -> anyhow::Result<Report> {
    let mut engines = Vec::new();
    for &load in &options.loads {
        eprintln!("ingest on SQLite, load {load}");
        engines.push(
            run_engine(load, options.runs, None)
                .await
                .with_context(|| format!("ingest on SQLite, load {load}"))?,
        );
    }
    if let Some(url) = &options.postgres_url {
        for &load in &options.loads {
            eprintln!("ingest on PostgreSQL, load {load}");
            engines.push(
                run_engine(load, options.runs, Some(url))
                    .await
                    .with_context(|| format!("ingest on PostgreSQL, load {load}"))?,
            );
        }
    }
    let postgres_skipped = options
        .postgres_url
        .is_none()
        .then(|| "not run: no PostgreSQL URL was given (`--postgres-url`)".to_string());
    Ok(Report {
        options,
        engines,
        postgres_skipped,
    })
}

/// The reference store of one engine.
enum Reference {
    Sqlite(RawSqlite),
    Postgres(RawPostgres),
}

impl Reference {
    async fn insert(&self, rows: &[Row]) -> anyhow::Result<()> {
        match self {
            Reference::Sqlite(db) => db.insert(rows).await,
            Reference::Postgres(db) => db.insert(rows).await,
        }
    }

    async fn close(self) {
        match self {
            Reference::Sqlite(db) => db.close().await,
            Reference::Postgres(db) => db.close().await,
        }
    }
}

async fn run_engine(
    load: Load,
    runs: usize,
    postgres_url: Option<&str>,
) -> anyhow::Result<EngineRuns> {
    let scratch = match postgres_url {
        Some(url) => Some(
            rawstore::ScratchDatabase::create(url, &format!("drover_bench_{}", std::process::id()))
                .await?,
        ),
        None => None,
    };
    let result = measure_engine(load, runs, scratch.as_ref().map(|s| s.url.as_str())).await;
    if let Some(scratch) = scratch {
        // The hub has stopped by now (or was killed when dropped); drop its database either way.
        scratch.drop_now().await?;
    }
    result
}

async fn measure_engine(
    load: Load,
    run_count: usize,
    database_url: Option<&str>,
) -> anyhow::Result<EngineRuns> {
    let load_before = machine::load_average();
    let work = tempfile::tempdir().context("making the hub's data directory")?;
    let hub_options = HubOptions {
        tls: false,
        database_url: database_url.map(str::to_string),
    };
    let mut hub = Hub::start_with(&work.path().join("hub"), &hub_options).await?;
    eprintln!("hub at {} (pid {})", hub.url, hub.pid());
    let reference = match database_url {
        Some(url) => Reference::Postgres(RawPostgres::create(url).await?),
        None => Reference::Sqlite(RawSqlite::create(&work.path().join("raw.db")).await?),
    };
    let provisioning_key = hub.create_fleet(FLEET, 3600).await?;
    eprintln!("enrolling {} devices...", load.devices);
    let mut devices = Vec::with_capacity(load.devices);
    for _ in 0..load.devices {
        devices.push(device::enrol(hub.http(), &hub.url, &provisioning_key).await?);
    }
    let plan = Plan::new(load, run_count, &devices);

    // Warm-up: one batch per device, which also creates every series.
    let warm_up = plan.build(&devices, 0, 1)?;
    send_all(&hub, &devices, warm_up.frames).await?;
    reference.insert(&warm_up.rows).await?;
    let mean_frame_bytes = warm_up.frame_bytes as f64 / load.devices as f64;

    let mut runs = Vec::with_capacity(run_count);
    for i in 0..run_count {
        let first = 1 + i as u32 * load.batches;
        let work = plan.build(&devices, first, load.batches)?;
        let points = work.rows.len() as u64;
        if points != load.points_per_run() {
            bail!(
                "built {points} points for a run, expected {}",
                load.points_per_run()
            );
        }
        let hub_first = checkin::hub_goes_first(i);
        let (hub_run, (raw_seconds, raw_cpu_seconds)) = if hub_first {
            let hub_run = measure_hub(&mut hub, &devices, work.frames).await?;
            (hub_run, measure_reference(&reference, &work.rows).await?)
        } else {
            let raw_run = measure_reference(&reference, &work.rows).await?;
            (measure_hub(&mut hub, &devices, work.frames).await?, raw_run)
        };
        let run = Run {
            hub_first,
            hub_points_per_sec: points as f64 / hub_run.acked_seconds,
            hub_queryable_points_per_sec: points as f64 / hub_run.queryable_seconds,
            raw_points_per_sec: points as f64 / raw_seconds,
            hub_cpu_ns_per_point: hub_run.cpu_seconds * 1e9 / points as f64,
            raw_cpu_ns_per_point: raw_cpu_seconds * 1e9 / points as f64,
            retries: hub_run.retries,
        };
        eprintln!(
            "run {}/{}: hub {:>9.0} points/s acknowledged, {:>9.0} queryable ({:.0} CPU ns/point, {} retries), reference {:>9.0} points/s ({:.0} CPU ns/point)",
            i + 1,
            run_count,
            run.hub_points_per_sec,
            run.hub_queryable_points_per_sec,
            run.hub_cpu_ns_per_point,
            run.retries,
            run.raw_points_per_sec,
            run.raw_cpu_ns_per_point
        );
        runs.push(run);
    }
    let load_after = machine::load_average();
    reference.close().await;
    check_stored(&hub, &devices, load, run_count).await?;
    hub.stop().await?;
    Ok(EngineRuns {
        engine: if database_url.is_some() {
            "PostgreSQL"
        } else {
            "SQLite"
        },
        load,
        mean_frame_bytes,
        load_average: (load_before, load_after),
        runs,
    })
}

/// What the devices send: each device's meter, and which batch covers which data.
struct Plan {
    meters: Vec<Meter>,
    batch_minutes: u32,
}

/// The encoded batches of some turn (per device, in sending order) and the same points as the
/// reference's rows (in arrival order).
struct Work {
    frames: Vec<Vec<Vec<u8>>>,
    rows: Vec<Row>,
    frame_bytes: usize,
}

impl Plan {
    fn new(load: Load, runs: usize, devices: &[EnrolledDevice]) -> Plan {
        let total_batches = 1 + runs as u32 * load.batches;
        let hours = (total_batches * load.minutes).div_ceil(60);
        let first_hour = meter::first_hour_ending_now(hours);
        Plan {
            meters: (0..devices.len())
                .map(|d| Meter::new(d as u64 + 1, first_hour))
                .collect(),
            batch_minutes: load.minutes,
        }
    }

    /// Batches `first .. first + count` of every device (batch `k` has sequence number
    /// `k + 1`).
    fn build(&self, devices: &[EnrolledDevice], first: u32, count: u32) -> anyhow::Result<Work> {
        let per_hour = 60 / self.batch_minutes;
        let readings_per_batch = meter::POLLS_PER_HOUR * meter::CHANNELS / per_hour as usize;
        let mut frames = vec![Vec::new(); devices.len()];
        let mut rows = Vec::new();
        let mut frame_bytes = 0;
        for k in first..first + count {
            let (hour, slice) = (k / per_hour, (k % per_hour) as usize);
            for (d, device) in devices.iter().enumerate() {
                let readings = self.meters[d].hour(hour);
                let readings =
                    readings[slice * readings_per_batch..(slice + 1) * readings_per_batch].to_vec();
                rows.extend(rawstore::rows(d, &readings));
                let frame = batch::encode(&Batch {
                    device: device.id.clone(),
                    seq: u64::from(k) + 1,
                    readings,
                })
                .context("encoding a batch")?;
                frame_bytes += frame.len();
                frames[d].push(frame);
            }
        }
        Ok(Work {
            frames,
            rows,
            frame_bytes,
        })
    }
}

/// One measured run of the hub.
struct HubRun {
    /// Until the last batch was acknowledged.
    acked_seconds: f64,
    /// Until a query had every point (it folds what landed first).
    queryable_seconds: f64,
    /// The hub's CPU seconds until then.
    cpu_seconds: f64,
    /// `503` answers (the batch was sent again).
    retries: u64,
}

/// Sends each device's frames on its own task, then asks for a device's series (which folds
/// every landed batch first); returns the times, the hub's CPU seconds meanwhile and the number
/// of `503` retries.
async fn measure_hub(
    hub: &mut Hub,
    devices: &[EnrolledDevice],
    frames: Vec<Vec<Vec<u8>>>,
) -> anyhow::Result<HubRun> {
    let cpu_before = procfs::cpu_ticks_tree(hub.pid())?;
    let started = Instant::now();
    let retries = send_all(hub, devices, frames).await?;
    let acked_seconds = started.elapsed().as_secs_f64();
    hub.series(devices[0].id.as_str()).await?;
    let queryable_seconds = started.elapsed().as_secs_f64();
    let cpu_after = procfs::cpu_ticks_tree(hub.pid())?;
    hub.ensure_running()?;
    Ok(HubRun {
        acked_seconds,
        queryable_seconds,
        cpu_seconds: cpu_after.saturating_sub(cpu_before) as f64 / procfs::TICKS_PER_SEC as f64,
        retries,
    })
}

/// Inserts the rows into the reference; returns the seconds it took and this process's CPU
/// seconds meanwhile.
async fn measure_reference(reference: &Reference, rows: &[Row]) -> anyhow::Result<(f64, f64)> {
    let cpu_before = procfs::cpu_ticks_tree(std::process::id())?;
    let started = Instant::now();
    reference.insert(rows).await?;
    let seconds = started.elapsed().as_secs_f64();
    let cpu = procfs::cpu_ticks_tree(std::process::id())?.saturating_sub(cpu_before);
    Ok((seconds, cpu as f64 / procfs::TICKS_PER_SEC as f64))
}

/// Every device sends its frames, one after another, all devices at once; returns the number
/// of `503` retries.
pub async fn send_all(
    hub: &Hub,
    devices: &[EnrolledDevice],
    frames: Vec<Vec<Vec<u8>>>,
) -> anyhow::Result<u64> {
    let mut tasks = JoinSet::new();
    for (device, frames) in devices.iter().zip(frames) {
        let (http, url, credential) = (
            hub.http().clone(),
            hub.url.clone(),
            device.credential.clone(),
        );
        tasks.spawn(async move {
            let mut retries = 0u64;
            for frame in frames {
                retries += u64::from(device::send_batch(&http, &url, &credential, &frame).await?);
            }
            anyhow::Ok(retries)
        });
    }
    let mut retries = 0;
    while let Some(done) = tasks.join_next().await {
        retries += done.context("a device's task failed")??;
    }
    Ok(retries)
}

/// Checks that the hub stored every point it acknowledged (series point counts).
async fn check_stored(
    hub: &Hub,
    devices: &[EnrolledDevice],
    load: Load,
    runs: usize,
) -> anyhow::Result<()> {
    let batches = 1 + runs as u64 * u64::from(load.batches);
    let expected = batches * load.points_per_batch() as u64;
    for device in devices.iter().take(3) {
        let stored: i64 = hub
            .series(device.id.as_str())
            .await?
            .iter()
            .map(|s| s.points)
            .sum();
        if u64::try_from(stored).ok() != Some(expected) {
            bail!(
                "device {} has {stored} points stored, but the hub acknowledged {expected}",
                device.id
            );
        }
    }
    Ok(())
}
