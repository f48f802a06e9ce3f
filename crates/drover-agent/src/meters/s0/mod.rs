//! S0 pulse inputs: an energy meter's pulse output on a GPIO line, counted into a persistent
//! register.
//!
//! - [`counter`]: edges → debounced pulses (no I/O; tests inject edges with timestamps).
//! - [`gpio`]: the Linux GPIO character device (gpiocdev, uapi v2): a thread that waits for
//!   the kernel's edge events and feeds them to the counter through an [`EdgeInput`].
//! - This module: the source. Each poll turns the count into two readings, `pulses` (the
//!   count) and `energy_import` (count × `wh_per_pulse`), for the meter `s0-<name>`.
//!
//! **The count survives restarts** in `<state_dir>/meters/s0-<name>.json`, written with
//! [`fsutil::write_json_atomic`] at most every `save_every` and at shutdown. A reading never
//! reports a count that is not on disk yet: when pulses arrived since the last save and the
//! next save is not due, the poll reports nothing. So after a crash the register continues
//! from at least every value the hub has seen, and never appears to go backwards. (The seed's
//! displayed counter started from zero at every restart.)

pub mod counter;
pub mod gpio;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use drover_protocol::reading::{Channel, MeterId, Reading};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use self::counter::PulseCounter;
use super::clock::Clock;
use super::config::S0SourceConfig;
use super::poll::{ErrorLog, Source};
use crate::fsutil::{self, FileError};

/// The counter file's content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Saved {
    pulses: u64,
}

/// Why an S0 source could not start.
#[derive(Debug, thiserror::Error)]
pub enum S0Error {
    /// The config names an invalid meter (it skipped validation).
    #[error("invalid S0 meter: {0}")]
    Config(String),
    /// The counter file could not be read or the directory made.
    #[error(transparent)]
    File(#[from] FileError),
    /// The thread that reads the GPIO line could not be started.
    #[error("cannot start the GPIO thread: {0}")]
    Thread(String),
}

/// Where edges go into a counter: held by the GPIO thread, or by a test.
#[derive(Debug, Clone)]
pub struct EdgeInput {
    counter: Arc<Mutex<PulseCounter>>,
}

impl EdgeInput {
    /// The line became active (`true`) or inactive at `t_ns` (a monotonic clock).
    pub fn edge(&self, active: bool, t_ns: u64) {
        self.lock().edge(active, t_ns);
    }

    /// The line is at this level now (read when it was opened); no pulse is counted.
    pub fn set_level(&self, active: bool, t_ns: u64) {
        self.lock().set_level(active, t_ns);
    }

    /// The pulses counted so far.
    pub fn count(&self) -> u64 {
        self.lock().count()
    }

    fn lock(&self) -> MutexGuard<'_, PulseCounter> {
        // The counter is plain data; a panic elsewhere cannot leave it half-updated.
        self.counter.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One S0 input.
#[derive(Debug)]
pub struct S0Source {
    meter: MeterId,
    input: EdgeInput,
    /// Energy per pulse as `(value, scale)`.
    per_pulse: (i64, i8),
    file: PathBuf,
    saved: u64,
    saved_at: Option<Instant>,
    save_every: Duration,
    clock: Arc<dyn Clock>,
    errors: ErrorLog<String>,
}

impl S0Source {
    /// The source for `config`, its count continued from the counter file in `meters_dir`,
    /// and the input its edges go to. Nothing touches GPIO here.
    pub fn open(
        config: &S0SourceConfig,
        meters_dir: &Path,
        clock: Arc<dyn Clock>,
    ) -> Result<(S0Source, EdgeInput), S0Error> {
        let meter = config
            .meter_id()
            .map_err(|e| S0Error::Config(e.to_string()))?;
        let per_pulse = config.energy_per_pulse().map_err(S0Error::Config)?;
        fsutil::create_dir_all(meters_dir, 0o700)?;
        let file = meters_dir.join(format!("{meter}.json"));
        let saved = load(&file)?;
        let input = EdgeInput {
            counter: Arc::new(Mutex::new(PulseCounter::new(config.debounce, false, saved))),
        };
        let source = S0Source {
            meter,
            input: input.clone(),
            per_pulse,
            file,
            saved,
            saved_at: None,
            save_every: config.save_every,
            clock,
            errors: ErrorLog::new(),
        };
        Ok((source, input))
    }

    /// The readings for the count now (see the module documentation for when there are none).
    pub fn read(&mut self) -> Vec<Reading> {
        let live = self.input.count();
        if live != self.saved {
            let due = self
                .saved_at
                .is_none_or(|at| at.elapsed() >= self.save_every);
            if !due {
                return Vec::new();
            }
            if let Err(e) = self.save(live) {
                self.errors.failed(&self.meter.to_string(), &e);
                return Vec::new();
            }
        }
        let ts_ms = self.clock.now_ms();
        let clock = self.clock.state();
        let reading = |channel, value, scale| Reading {
            meter: self.meter.clone(),
            channel,
            ts_ms,
            value,
            scale,
            clock,
        };
        let pulses = i64::try_from(self.saved).unwrap_or(i64::MAX);
        let mut readings = vec![reading(Channel::Pulses, pulses, 0)];
        match pulses.checked_mul(self.per_pulse.0) {
            Some(energy) => readings.push(reading(Channel::EnergyImport, energy, self.per_pulse.1)),
            None => {
                self.errors
                    .failed(&self.meter.to_string(), &"the energy register overflowed");
            }
        }
        readings
    }

    /// Writes the count if it changed since the last write.
    pub fn save_now(&mut self) -> Result<(), FileError> {
        let live = self.input.count();
        if live == self.saved {
            return Ok(());
        }
        self.save(live)
    }

    fn save(&mut self, pulses: u64) -> Result<(), FileError> {
        fsutil::write_json_atomic(&self.file, &Saved { pulses }, fsutil::PUBLIC)?;
        self.errors.succeeded(&self.meter.to_string());
        self.saved = pulses;
        self.saved_at = Some(Instant::now());
        Ok(())
    }
}

/// The saved count; 0 for a new meter. A damaged file is kept aside (as `.bad`) and counting
/// starts over, loudly: the hub will see the register reset and flag it.
fn load(file: &Path) -> Result<u64, FileError> {
    match fsutil::read_json::<Saved>(file) {
        Ok(saved) => Ok(saved.map_or(0, |s| s.pulses)),
        Err(e) if e.action == "parsing" => {
            tracing::error!(error = %e, "the S0 counter file is damaged; counting starts from 0");
            let aside = file.with_extension("json.bad");
            std::fs::rename(file, &aside).map_err(|e| FileError::new("renaming", file, e))?;
            Ok(0)
        }
        Err(e) => Err(e),
    }
}

impl Source for S0Source {
    async fn poll(&mut self) -> Vec<Reading> {
        self.read()
    }

    async fn stop(&mut self) {
        if let Err(e) = self.save_now() {
            tracing::error!(meter = %self.meter, error = %e, "cannot save the S0 counter at shutdown");
        }
    }
}

#[cfg(test)]
mod tests {
    use drover_protocol::reading::ClockState;

    use super::*;
    use crate::testutil::FixedClock;

    const MS: u64 = 1_000_000;

    fn config() -> S0SourceConfig {
        S0SourceConfig {
            name: "heatpump".into(),
            line: 17,
            wh_per_pulse: 1.25,
            save_every: Duration::from_secs(5),
            ..S0SourceConfig::default()
        }
    }

    fn pulses(input: &EdgeInput, from_ms: u64, n: u64) {
        for i in 0..n {
            let at = (from_ms + i * 100) * MS;
            input.edge(true, at);
            // A bounce inside the debounce window.
            input.edge(false, at + MS);
            input.edge(true, at + 2 * MS);
            input.edge(false, at + 50 * MS);
        }
    }

    fn values(readings: &[Reading]) -> Vec<(Channel, i64, i8)> {
        readings
            .iter()
            .map(|r| (r.channel, r.value, r.scale))
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn the_count_persists_across_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let (mut source, input) = S0Source::open(
            &config(),
            dir.path(),
            Arc::new(FixedClock(ClockState::Synced)),
        )
        .unwrap();
        let first = source.read();
        assert_eq!(first[0].meter.as_str(), "s0-heatpump");
        assert_eq!(
            values(&first),
            [(Channel::Pulses, 0, 0), (Channel::EnergyImport, 0, -2)]
        );
        pulses(&input, 1_000, 3);
        assert_eq!(values(&source.read())[0], (Channel::Pulses, 3, 0));
        // More pulses before the next save is due: nothing is reported that is not on disk.
        pulses(&input, 2_000, 2);
        assert!(source.read().is_empty());
        tokio::time::advance(Duration::from_secs(5)).await;
        let readings = source.read();
        assert_eq!(
            values(&readings),
            [(Channel::Pulses, 5, 0), (Channel::EnergyImport, 625, -2)]
        );
        pulses(&input, 3_000, 4);
        source.stop().await;
        drop(source);

        // The restart: the count continues from the file.
        let (mut source, input) = S0Source::open(
            &config(),
            dir.path(),
            Arc::new(FixedClock(ClockState::Synced)),
        )
        .unwrap();
        assert_eq!(values(&source.read())[0], (Channel::Pulses, 9, 0));
        pulses(&input, 10_000, 1);
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(values(&source.read())[0], (Channel::Pulses, 10, 0));
    }

    #[tokio::test]
    async fn a_damaged_counter_file_is_kept_aside() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("s0-heatpump.json"), b"{\"pul").unwrap();
        let (mut source, _) = S0Source::open(
            &config(),
            dir.path(),
            Arc::new(FixedClock(ClockState::Synced)),
        )
        .unwrap();
        assert_eq!(values(&source.read())[0], (Channel::Pulses, 0, 0));
        assert!(dir.path().join("s0-heatpump.json.bad").exists());
    }
}
