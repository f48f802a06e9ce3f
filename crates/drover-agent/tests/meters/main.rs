//! The meter sources against real parts: a real Modbus TCP server (tokio-modbus) on
//! `127.0.0.1:0` laid out like an M-Bus gateway, the real `drover-agent` binary for the probe,
//! real programs for the command source. Readings are taken from the sink that
//! `drover_agent::meters::start` sends to, exactly as the spool will take them.
//!
//! - [`gateway`]: the test gateway (meters in slots, injected faults, a slow mode, counters);
//! - [`modbus`]: discovery with the three built-in maps, all 64 bits, a failing meter, one
//!   connection, a restarted gateway, no overlapping polls, replaced and added meters;
//! - [`probe`]: `drover-agent modbus probe`;
//! - [`sources`]: several sources at once, one of them failing; shutdown saves state.

#![allow(clippy::unwrap_used, reason = "a panic is how a test fails")]

mod gateway;
mod modbus;
mod probe;
mod sources;

use std::sync::Arc;
use std::time::Duration;

use drover_agent::meters::{self, Clock, MeterTasks, MetersConfig, SystemClock};
use drover_protocol::reading::Reading;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// How long a test waits for something that should happen within a few polls.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// Sources started in a temporary state directory, with the receiving end of their sink.
pub struct Running {
    pub readings: mpsc::Receiver<Vec<Reading>>,
    pub shutdown: CancellationToken,
    pub tasks: Option<MeterTasks>,
    pub dir: tempfile::TempDir,
}

impl Running {
    /// Starts `config` with a clock that reports itself synchronised.
    pub fn start(config: &MetersConfig) -> Running {
        let dir = tempfile::tempdir().unwrap();
        Running::start_in(config, dir)
    }

    /// Starts `config` with `dir` as the state directory.
    pub fn start_in(config: &MetersConfig, dir: tempfile::TempDir) -> Running {
        let flag = dir.path().join("synchronized");
        std::fs::write(&flag, b"").unwrap();
        let clock: Arc<dyn Clock> = Arc::new(SystemClock::with_flag(flag));
        let (sink, readings) = mpsc::channel(64);
        let shutdown = CancellationToken::new();
        let tasks = meters::start(config, dir.path(), clock, sink, shutdown.clone());
        Running {
            readings,
            shutdown,
            tasks: Some(tasks),
            dir,
        }
    }

    /// The next batch of readings.
    pub async fn next(&mut self) -> Vec<Reading> {
        tokio::time::timeout(PATIENCE, self.readings.recv())
            .await
            .expect("a batch of readings in time")
            .expect("the sources to be running")
    }

    /// Waits for the first batch that satisfies `want`, dropping the others.
    pub async fn until(
        &mut self,
        what: &str,
        mut want: impl FnMut(&[Reading]) -> bool,
    ) -> Vec<Reading> {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let batch = tokio::time::timeout(left, self.readings.recv())
                .await
                .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
                .expect("the sources to be running");
            if want(&batch) {
                return batch;
            }
        }
    }

    /// Drops every batch received so far.
    pub fn drain(&mut self) {
        while self.readings.try_recv().is_ok() {}
    }

    /// Stops the sources and waits for them.
    pub async fn stop(&mut self) {
        self.shutdown.cancel();
        if let Some(tasks) = self.tasks.take() {
            tokio::time::timeout(PATIENCE, tasks.join()).await.unwrap();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// (meter, value) of every reading of `channel` in a batch, sorted.
pub fn values(batch: &[Reading], channel: drover_protocol::reading::Channel) -> Vec<(String, i64)> {
    let mut v: Vec<(String, i64)> = batch
        .iter()
        .filter(|r| r.channel == channel)
        .map(|r| (r.meter.to_string(), r.value))
        .collect();
    v.sort();
    v
}

/// The meters in a batch, sorted and unique.
pub fn meters_in(batch: &[Reading]) -> Vec<String> {
    let mut v: Vec<String> = batch.iter().map(|r| r.meter.to_string()).collect();
    v.sort();
    v.dedup();
    v
}
