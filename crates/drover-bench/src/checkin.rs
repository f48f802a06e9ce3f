//! Benchmark 1: no-change check-ins per second and their p99 latency against one hub, beside
//! nginx answering the identical requests with a static `204`, measured in the same run with
//! the same load generator, so the ratio holds on a shared, noisy machine where the absolute
//! figures do not.
//!
//! Steps: start the hub, enrol devices over the real device API and settle each one (it holds
//! its desired state and its check-in is answered `204`), start nginx, then alternate wrk runs
//! against the two, each load the same for both. Afterwards the hub is stopped with SIGTERM
//! and started again on the same data directory: every device must then show a last-seen time
//! from the measured window, which proves that the batched last-seen writes happened.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};

use crate::device::{self, SettledDevice};
use crate::hub::Hub;
use crate::machine;
use crate::nginx::Nginx;
use crate::procfs;
use crate::wrk::{self, Load, WrkResult};

/// The fleet the simulated devices enrol in.
const FLEET: &str = "bench";
/// The path every check-in goes to, on the hub and on nginx alike.
const CHECKIN_PATH: &str = "/device/v1/checkin";

/// How the check-in benchmark runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// Devices to enrol; wrk cycles over their credentials.
    pub devices: usize,
    /// Measured runs per server and load.
    pub runs: usize,
    /// Length of each measured run.
    pub duration: Duration,
    /// Length of the unmeasured warm-up run per server and load.
    pub warmup: Duration,
    /// wrk threads and connections to measure with, each for both servers.
    pub loads: Vec<Load>,
}

/// One measured wrk run.
#[derive(Debug, Clone)]
pub struct Run {
    /// What wrk reported.
    pub wrk: WrkResult,
    /// CPU time the server (all its processes) spent per completed request, in microseconds.
    pub cpu_us_per_request: f64,
}

/// The runs of one load.
#[derive(Debug, Clone)]
pub struct LoadRuns {
    /// The load.
    pub load: Load,
    /// Runs against the hub.
    pub hub: Vec<Run>,
    /// Runs against nginx.
    pub nginx: Vec<Run>,
}

/// Everything the check-in benchmark found.
#[derive(Debug, Clone)]
pub struct Report {
    /// How it ran.
    pub options: Options,
    /// The hub's worker threads (tokio's default: one per core) and nginx's worker processes.
    pub workers: usize,
    /// Runs, per load.
    pub loads: Vec<LoadRuns>,
    /// Devices whose last-seen time, read back after a hub restart, falls in the measured window.
    pub last_seen_written: usize,
    /// wrk's version line.
    pub wrk_version: String,
    /// nginx's version line.
    pub nginx_version: String,
    /// The one-minute load average before and after the runs.
    pub load_average: (String, String),
}

/// Runs the benchmark.
pub async fn run(options: Options) -> anyhow::Result<Report> {
    let wrk_path = crate::children::system_tool(wrk::WRK)?;
    let nginx_path = crate::children::system_tool("nginx")?;
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let load_before = machine::load_average();

    let data_dir = tempfile::tempdir().context("making the hub's data directory")?;
    let mut hub = Hub::start(data_dir.path()).await?;
    eprintln!("hub at {} (pid {})", hub.url, hub.pid());
    let provisioning_key = hub.create_fleet(FLEET, 60).await?;
    eprintln!("enrolling {} devices...", options.devices);
    let mut devices = Vec::with_capacity(options.devices);
    for _ in 0..options.devices {
        devices.push(device::enrol_and_settle(hub.http(), &hub.url, &provisioning_key).await?);
    }

    let work_dir = tempfile::tempdir().context("making the wrk and nginx directory")?;
    let script = work_dir.path().join("checkin.lua");
    let requests: Vec<wrk::CheckinRequest> = devices
        .iter()
        .map(|d| wrk::CheckinRequest {
            credential: d.credential.clone(),
            body: d.body.clone(),
        })
        .collect();
    std::fs::write(&script, wrk::lua_script(CHECKIN_PATH, &requests))
        .with_context(|| format!("writing {}", script.display()))?;
    let nginx = Nginx::start(work_dir.path(), workers, hub.http()).await?;
    eprintln!(
        "nginx at {} (pid {}, {workers} workers)",
        nginx.url,
        nginx.pid()
    );

    let window_start = unix_ms();
    let mut loads = Vec::new();
    for &load in &options.loads {
        loads.push(measure_load(&options, load, &mut hub, &nginx, &script, &devices).await?);
    }
    let load_after = machine::load_average();
    nginx.stop().await?;

    let last_seen_written = verify_last_seen(hub, data_dir.path(), window_start, &devices).await?;
    Ok(Report {
        options,
        workers,
        loads,
        last_seen_written,
        wrk_version: machine::tool_version(&wrk_path, "-v").await,
        nginx_version: machine::tool_version(&nginx_path, "-v").await,
        load_average: (load_before, load_after),
    })
}

/// Warm-up, then alternating measured runs against the hub and nginx at one load.
async fn measure_load(
    options: &Options,
    load: Load,
    hub: &mut Hub,
    nginx: &Nginx,
    script: &std::path::Path,
    devices: &[SettledDevice],
) -> anyhow::Result<LoadRuns> {
    let hub_target = Target {
        name: "hub",
        url: format!("{}{CHECKIN_PATH}", hub.url),
        pid: hub.pid(),
    };
    let nginx_target = Target {
        name: "nginx",
        url: format!("{}{CHECKIN_PATH}", nginx.url),
        pid: nginx.pid(),
    };
    eprintln!("load {load}: warming up");
    hub_target.measure(script, load, options.warmup).await?;
    nginx_target.measure(script, load, options.warmup).await?;
    let mut runs = LoadRuns {
        load,
        hub: Vec::new(),
        nginx: Vec::new(),
    };
    for i in 0..options.runs {
        for target in if hub_goes_first(i) {
            [&hub_target, &nginx_target]
        } else {
            [&nginx_target, &hub_target]
        } {
            let run = target.measure(script, load, options.duration).await?;
            eprintln!(
                "load {load} run {}/{} {:>5}: {:>9.0} req/s  p99 {:>8.2?}  {:.1} CPU µs/req",
                i + 1,
                options.runs,
                target.name,
                run.wrk.requests_per_sec,
                run.wrk.p99,
                run.cpu_us_per_request
            );
            if target.name == "hub" {
                if run.wrk.non_2xx_3xx > 0 {
                    bail!(
                        "the hub answered {} of {} check-ins with an error status; the figures would be meaningless",
                        run.wrk.non_2xx_3xx,
                        run.wrk.requests
                    );
                }
                runs.hub.push(run);
            } else {
                runs.nginx.push(run);
            }
        }
        hub.ensure_running()?;
    }
    // The hub must still be answering the no-change path, not something else, after the load.
    if let Some(device) = devices.first() {
        device::expect_no_change(hub.http(), &hub.url, device).await?;
    }
    Ok(runs)
}

/// Whether the hub goes first in run pair `i`. The order alternates, so that a slow drift in
/// the machine's load (another engineer's build starting) does not always land on one server.
pub fn hub_goes_first(i: usize) -> bool {
    i.is_multiple_of(2)
}

/// A server under load.
struct Target {
    name: &'static str,
    url: String,
    pid: u32,
}

impl Target {
    async fn measure(
        &self,
        script: &std::path::Path,
        load: Load,
        duration: Duration,
    ) -> anyhow::Result<Run> {
        let before = procfs::cpu_ticks_tree(self.pid)?;
        let wrk = wrk::run(&self.url, script, load, duration)
            .await
            .with_context(|| format!("measuring {} at {load}", self.name))?;
        let after = procfs::cpu_ticks_tree(self.pid)?;
        let cpu_seconds = after.saturating_sub(before) as f64 / procfs::TICKS_PER_SEC as f64;
        let cpu_us_per_request = if wrk.requests == 0 {
            f64::NAN
        } else {
            cpu_seconds * 1e6 / wrk.requests as f64
        };
        Ok(Run {
            wrk,
            cpu_us_per_request,
        })
    }
}

/// Stops the hub (it writes its last presence batch on the way out), starts it again on the
/// same data directory, and counts the devices whose stored last-seen time falls after
/// `window_start`. A fresh hub has nothing buffered, so what it shows came from the database.
async fn verify_last_seen(
    hub: Hub,
    data_dir: &std::path::Path,
    window_start: i64,
    devices: &[SettledDevice],
) -> anyhow::Result<usize> {
    hub.stop()
        .await
        .context("stopping the hub after the runs")?;
    let hub = Hub::start(data_dir).await.context("restarting the hub")?;
    let listed = hub.devices(FLEET).await?;
    let written = listed
        .iter()
        .filter(|d| d.last_seen.is_some_and(|t| t >= window_start))
        .count();
    hub.stop().await?;
    if written != devices.len() {
        bail!(
            "after the runs only {written} of {} devices have a stored last-seen time from the measured window: the hub did not write its batched last-seen times",
            devices.len()
        );
    }
    Ok(written)
}

fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
