//! Benchmark 2: the agent's footprint. The size of the release `drover-agent` binary (the
//! workspace's release profile strips it), and its resident memory while idle: enrolled,
//! checking in every second, with no update to work on.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::children::{self, Child};
use crate::hub::Hub;
use crate::procfs;
use crate::stats;

/// The fleet the agent enrols in.
const FLEET: &str = "agent-bench";
/// Check-ins seen (distinct last-seen times) before the agent counts as settled.
pub const SETTLED_CHECKINS: usize = 4;
/// How long the agent may take to enrol and settle.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);

/// How the agent benchmark runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// RSS samples to take.
    pub samples: usize,
    /// Time between samples.
    pub interval: Duration,
}

/// What the agent benchmark found.
#[derive(Debug, Clone)]
pub struct Report {
    /// How it ran.
    pub options: Options,
    /// The binary measured.
    pub binary: PathBuf,
    /// Its size in bytes.
    pub binary_bytes: u64,
    /// Whether it still has a symbol table.
    pub has_symbols: bool,
    /// VmRSS samples, in KiB.
    pub rss_kib: Vec<u64>,
    /// VmHWM (peak resident memory since start) at the end, in KiB.
    pub peak_kib: u64,
    /// Check-ins seen (distinct last-seen times) before and during sampling.
    pub checkins_seen: usize,
}

impl Report {
    /// The median RSS sample, in KiB.
    pub fn median_rss_kib(&self) -> f64 {
        stats::median(&self.rss_f64()).unwrap_or(f64::NAN)
    }

    /// The largest RSS sample, in KiB.
    pub fn max_rss_kib(&self) -> f64 {
        stats::max(&self.rss_f64()).unwrap_or(f64::NAN)
    }

    fn rss_f64(&self) -> Vec<f64> {
        self.rss_kib.iter().map(|&k| k as f64).collect()
    }
}

/// Runs the benchmark.
pub async fn run(options: Options) -> anyhow::Result<Report> {
    let binary = children::sibling_binary("drover-agent")?;
    let binary_bytes = std::fs::metadata(&binary)
        .with_context(|| format!("reading the size of {}", binary.display()))?
        .len();
    let has_symbols = procfs::has_symbol_table(&binary)?;

    let data_dir = tempfile::tempdir().context("making the hub's data directory")?;
    let hub = Hub::start(data_dir.path()).await?;
    let provisioning_key = hub.create_fleet(FLEET, 1).await?;
    let agent_dir = tempfile::tempdir().context("making the agent's directory")?;
    let config = agent_dir.path().join("agent.toml");
    std::fs::write(
        &config,
        agent_config(&hub.url, &provisioning_key, &agent_dir.path().join("state")),
    )
    .with_context(|| format!("writing {}", config.display()))?;
    let mut command = tokio::process::Command::new(&binary);
    command.arg("run").arg("--config").arg(&config);
    command.env_remove("RUST_LOG");
    let mut agent = Child::spawn("drover-agent", command)?;
    eprintln!("agent pid {} against hub {}", agent.pid(), hub.url);

    let mut seen = CheckinCounter::default();
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    while seen.count() < SETTLED_CHECKINS {
        agent.ensure_running()?;
        if Instant::now() > deadline {
            bail!(
                "the agent did not enrol and check in {SETTLED_CHECKINS} times within {SETTLE_TIMEOUT:?} (saw {}); its output:\n{}",
                seen.count(),
                agent.recent_stderr().join("\n")
            );
        }
        seen.observe(&hub).await?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    eprintln!("agent settled; sampling VmRSS {} times", options.samples);
    let mut rss_kib = Vec::with_capacity(options.samples);
    for _ in 0..options.samples {
        agent.ensure_running()?;
        rss_kib.push(procfs::status_kib(agent.pid(), "VmRSS")?);
        seen.observe(&hub).await?;
        tokio::time::sleep(options.interval).await;
    }
    let peak_kib = procfs::status_kib(agent.pid(), "VmHWM")?;
    agent.terminate(Duration::from_secs(10)).await?;
    hub.stop().await?;
    Ok(Report {
        options,
        binary,
        binary_bytes,
        has_symbols,
        rss_kib,
        peak_kib,
        checkins_seen: seen.count(),
    })
}

/// The agent's config: this hub, a short poll floor so it checks in every second.
fn agent_config(hub_url: &str, provisioning_key: &str, state_dir: &Path) -> String {
    format!(
        r#"hub_url = "{hub_url}"
provisioning_key = "{provisioning_key}"
state_dir = "{}"
device_type = "bench-x86_64"

[poll]
min_interval = "1s"
default_interval = "1s"
"#,
        state_dir.display()
    )
}

/// Counts the agent's check-ins from the hub's side: each one moves its last-seen time.
#[derive(Debug, Default)]
struct CheckinCounter {
    last: Option<i64>,
    count: usize,
}

impl CheckinCounter {
    async fn observe(&mut self, hub: &Hub) -> anyhow::Result<()> {
        let devices = hub.devices(FLEET).await?;
        let last_seen = devices.iter().filter_map(|d| d.last_seen).max();
        if last_seen.is_some() && last_seen != self.last {
            self.last = last_seen;
            self.count += 1;
        }
        Ok(())
    }

    fn count(&self) -> usize {
        self.count
    }
}
