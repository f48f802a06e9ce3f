//! The telemetry path as the agent runs it: meter sources → spool → sender → hub, started
//! together and stopped in order. See [`crate::meters`], [`crate::spool`], [`crate::sender`].

use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::client::HubClient;
use crate::config::AgentConfig;
use crate::layout::StateDir;
use crate::meters::{self, MeterTasks, SystemClock};
use crate::sender::{Enrolled, Sender, Telemetry};
use crate::spool::{self, Spool};

/// Readings waiting between the meter sources and the spool; a full queue makes the sources
/// wait (their next poll is delayed), it never drops readings.
const METER_QUEUE: usize = 64;

/// The telemetry path while it runs: meter sources -> spool -> sender -> hub.
#[derive(Default)]
pub struct TelemetryTasks {
    meters: MeterTasks,
    spool: Option<JoinHandle<Result<(), spool::SpoolError>>>,
    sender: Option<JoinHandle<Result<(), crate::sender::SenderError>>>,
    /// For check-ins: the spool's and the sender's figures.
    pub telemetry: Option<Telemetry>,
}

impl TelemetryTasks {
    /// Stops in order: the meters first (they hand over their last readings and save their
    /// state), then the spool (it appends what is queued and syncs), then the sender (already
    /// told to stop by `shutdown`; a batch cut short goes again after the next start).
    pub async fn join(self) {
        self.meters.join().await;
        if let Some(spool) = self.spool {
            match spool.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!(error = %e, "the spool stopped with an error"),
                Err(e) => tracing::error!(error = %e, "the spool task crashed"),
            }
        }
        if let Some(sender) = self.sender {
            match sender.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!(error = %e, "the sender stopped with an error"),
                Err(e) => tracing::error!(error = %e, "the sender task crashed"),
            }
        }
    }
}

/// Starts the telemetry path when meters are configured, or when the spool still holds
/// readings from an earlier configuration (they are sent all the same).
///
/// Telemetry never stops the agent: if the spool cannot be opened, the error is logged and the
/// agent goes on with updates, without meters (a box that can still be updated can be fixed).
pub fn start_telemetry(
    config: &AgentConfig,
    paths: &StateDir,
    client: &HubClient,
    enrolled: watch::Receiver<Option<Enrolled>>,
    shutdown: &CancellationToken,
) -> TelemetryTasks {
    if config.meters.is_empty() && !paths.spool_dir().exists() {
        return TelemetryTasks::default();
    }
    let spool = match Spool::open(&paths.spool_dir(), &config.spool) {
        Ok(spool) => Arc::new(Mutex::new(spool)),
        Err(e) => {
            tracing::error!(error = %e, "cannot open the spool; meters are not started and no readings are sent");
            return TelemetryTasks::default();
        }
    };
    let sender = Sender::new(
        Arc::clone(&spool),
        client.clone(),
        enrolled,
        config.telemetry.clone(),
        paths.telemetry_json(),
    );
    let (sender, telemetry) = match sender {
        Ok(parts) => parts,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the sender; meters are not started and no readings are sent");
            return TelemetryTasks::default();
        }
    };
    let (sink, readings) = tokio::sync::mpsc::channel(METER_QUEUE);
    // Not stopped by `shutdown`: the spool task ends when the last meter source has stopped
    // and dropped its sink, so the readings of their last polls are stored too.
    let spool_task = tokio::spawn(spool::task::run(
        Arc::clone(&spool),
        readings,
        CancellationToken::new(),
    ));
    let sender_task = tokio::spawn(sender.run(shutdown.child_token()));
    let meters = meters::start(
        &config.meters,
        paths.root(),
        Arc::new(SystemClock::new()),
        sink,
        shutdown.child_token(),
    );
    TelemetryTasks {
        meters,
        spool: Some(spool_task),
        sender: Some(sender_task),
        telemetry: Some(telemetry),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::meters::config::SimulatedSourceConfig;

    #[tokio::test]
    async fn configured_meters_fill_the_spool_and_stop_with_the_agent() {
        let dir = tempfile::tempdir().unwrap();
        let paths = StateDir::new(dir.path());
        let shutdown = CancellationToken::new();
        let mut config = AgentConfig {
            hub_url: "http://127.0.0.1:9".into(),
            ..AgentConfig::default()
        };
        let client = HubClient::new(&config).unwrap();
        let (_enrolled, watch) = watch::channel(None);
        let none = start_telemetry(&config, &paths, &client, watch.clone(), &shutdown);
        assert!(none.telemetry.is_none() && none.meters.is_empty());

        config.meters.simulated.push(SimulatedSourceConfig {
            name: "roof".into(),
            interval: Duration::from_millis(100),
            ..SimulatedSourceConfig::default()
        });
        let tasks = start_telemetry(&config, &paths, &client, watch, &shutdown);
        assert_eq!(tasks.meters.len(), 1);
        let telemetry = tasks.telemetry.clone().unwrap();
        // Not enrolled: nothing is sent, so the readings wait in the spool.
        crate::testutil::wait_until("readings in the spool", || telemetry.status().spooled >= 6)
            .await;
        shutdown.cancel();
        tasks.join().await;
        let status = telemetry.status();
        assert_eq!(status.dropped, 0);
        assert_eq!(status.batch_interval_s, 60);
    }
}
