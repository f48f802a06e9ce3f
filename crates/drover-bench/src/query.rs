//! Query latency: "the last 24 hours of one series at 1-minute resolution" through the hub's
//! API (`GET /api/v1/series/{id}/data?resolution=1m`, answered from the 1-minute rollups),
//! beside the same question put to the same points stored one row per point in SQLite and
//! answered by scanning them (`GROUP BY` minute over 43,200 rows), measured in the same run.
//! The raw-resolution API query over the same day is measured too, for context.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use drover_protocol::batch::{self, Batch};
use serde::Deserialize;

use crate::device;
use crate::hub::Hub;
use crate::meter::{self, HOUR_MS, Meter};
use crate::rawstore::{self, RawSqlite};
use crate::{checkin, machine, stats};

/// The fleet of the one device.
const FLEET: &str = "bench-query";
/// Hours of data: one day.
pub const HOURS: u32 = 24;

/// What to measure.
#[derive(Debug, Clone)]
pub struct Options {
    /// Requests per measured run and kind (the raw-resolution query gets a quarter).
    pub requests: usize,
    /// Measured runs.
    pub runs: usize,
}

/// Latencies of one kind of query in one run, in milliseconds.
#[derive(Debug, Clone)]
pub struct Latencies {
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
}

/// One measured run.
#[derive(Debug, Clone)]
pub struct Run {
    /// The API at 1-minute resolution.
    pub api_1m: Latencies,
    /// The API at raw resolution.
    pub api_raw: Latencies,
    /// The scan of one row per point.
    pub scan: Latencies,
    /// Whether the API went first.
    pub api_first: bool,
}

/// Everything measured.
#[derive(Debug)]
pub struct Report {
    /// What was asked.
    pub options: Options,
    /// Points in the day of the series queried.
    pub points: usize,
    /// Buckets the 1-minute answer holds.
    pub buckets: usize,
    /// Bytes of the 1-minute answer's JSON body.
    pub body_bytes_1m: usize,
    /// Bytes of the raw answer's JSON body.
    pub body_bytes_raw: usize,
    /// Each run.
    pub runs: Vec<Run>,
    /// Load average (1 min) before and after.
    pub load_average: (String, String),
}

#[derive(Debug, Deserialize)]
struct DataView {
    points: Vec<(i64, f64)>,
}

/// Ingests a day of one meter, then measures.
pub async fn run(options: Options) -> anyhow::Result<Report> {
    let load_before = machine::load_average();
    let work = tempfile::tempdir().context("making the hub's data directory")?;
    let mut hub = Hub::start(&work.path().join("hub")).await?;
    eprintln!("hub at {} (pid {})", hub.url, hub.pid());
    let provisioning_key = hub.create_fleet(FLEET, 3600).await?;
    let device = device::enrol(hub.http(), &hub.url, &provisioning_key).await?;
    let first_hour = meter::first_hour_ending_now(HOURS);
    let meter = Meter::new(1, first_hour);
    let raw = RawSqlite::create(&work.path().join("raw.db")).await?;
    eprintln!("ingesting {HOURS} hours of one meter...");
    for hour in 0..HOURS {
        let readings = meter.hour(hour);
        raw.insert(&rawstore::rows(0, &readings)).await?;
        let frame = batch::encode(&Batch {
            device: device.id.clone(),
            seq: u64::from(hour) + 1,
            readings,
        })
        .context("encoding a batch")?;
        device::send_batch(hub.http(), &hub.url, &device.credential, &frame).await?;
    }
    let series = hub.series(device.id.as_str()).await?;
    let power = series
        .iter()
        .find(|s| s.channel == "power")
        .context("the hub lists no power series for the device")?;
    let (from, to) = (first_hour, first_hour + i64::from(HOURS) * HOUR_MS);
    // The reference's series ID of device 0's power channel (see `rawstore::rows`).
    let raw_series = meter::channel_index(drover_protocol::reading::Channel::Power);

    // Check both answer the same question before timing them.
    let url_1m = format!(
        "{}/api/v1/series/{}/data?resolution=1m&from={from}&to={to}",
        hub.url, power.id
    );
    let url_raw = format!(
        "{}/api/v1/series/{}/data?resolution=raw&from={from}&to={to}",
        hub.url, power.id
    );
    let (body_bytes_1m, buckets) = api_query(&hub, &url_1m).await?;
    let (body_bytes_raw, points) = api_query(&hub, &url_raw).await?;
    let scanned = raw.minute_averages(raw_series, from, to).await?;
    let expected_points = meter::POLLS_PER_HOUR * HOURS as usize;
    if buckets != scanned || points != expected_points {
        bail!(
            "the answers disagree: API {buckets} minutes and {points} points, scan {scanned} \
             minutes, {expected_points} points ingested"
        );
    }

    let mut runs = Vec::with_capacity(options.runs);
    for i in 0..options.runs {
        let api_first = checkin::hub_goes_first(i);
        let api_turn = || async {
            let one_minute = time_requests(options.requests, || api_query(&hub, &url_1m)).await?;
            let raw_points =
                time_requests(options.requests.div_ceil(4), || api_query(&hub, &url_raw)).await?;
            anyhow::Ok((one_minute, raw_points))
        };
        let scan_turn = || {
            time_requests(options.requests, || async {
                raw.minute_averages(raw_series, from, to)
                    .await
                    .map(|n| (0, n))
            })
        };
        let ((api_1m, api_raw), scan) = if api_first {
            let api = api_turn().await?;
            (api, scan_turn().await?)
        } else {
            let scan = scan_turn().await?;
            (api_turn().await?, scan)
        };
        eprintln!(
            "run {}/{}: API 1m p50 {:.2} ms p99 {:.2} ms; raw scan p50 {:.2} ms p99 {:.2} ms; API raw p50 {:.2} ms",
            i + 1,
            options.runs,
            api_1m.p50,
            api_1m.p99,
            scan.p50,
            scan.p99,
            api_raw.p50
        );
        runs.push(Run {
            api_1m,
            api_raw,
            scan,
            api_first,
        });
        hub.ensure_running()?;
    }
    raw.close().await;
    hub.stop().await?;
    Ok(Report {
        options,
        points,
        buckets,
        body_bytes_1m,
        body_bytes_raw,
        runs,
        load_average: (load_before, machine::load_average()),
    })
}

/// One API query; returns the body's size and the number of points in it.
async fn api_query(hub: &Hub, url: &str) -> anyhow::Result<(usize, usize)> {
    let response = hub
        .http()
        .get(url)
        .bearer_auth(hub.admin_token())
        .send()
        .await
        .context("GET /api/v1/series/{id}/data")?;
    let status = response.status();
    let body = response.bytes().await.context("reading a query's answer")?;
    if !status.is_success() {
        bail!(
            "a query was answered {status}: {}",
            String::from_utf8_lossy(&body)
        );
    }
    let view: DataView = serde_json::from_slice(&body).context("decoding a query's answer")?;
    Ok((body.len(), view.points.len()))
}

/// Runs `query` `n` times in a row, timing each.
async fn time_requests<F, Fut>(n: usize, mut query: F) -> anyhow::Result<Latencies>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<(usize, usize)>>,
{
    let mut ms = Vec::with_capacity(n);
    for _ in 0..n {
        let started = Instant::now();
        query().await?;
        ms.push(duration_ms(started.elapsed()));
    }
    Ok(Latencies {
        p50: stats::median(&ms).unwrap_or(f64::NAN),
        p99: stats::percentile(&ms, 0.99).unwrap_or(f64::NAN),
    })
}

fn duration_ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
