//! A simulated solar production meter, for `drover demo` and for trying the data path without
//! hardware: an energy register, power and voltage L1 that look like a roof of panels.
//!
//! The model:
//! - **Sun**: the solar elevation for the configured latitude and longitude (declination by
//!   day of year, hour angle by longitude; no equation of time), so days are long in June and
//!   short in December and noon is the local solar noon. Clear-sky power follows the direct
//!   sunlight through the air mass, `sin e × 0.7^((1 / sin e)^0.678)` for the elevation `e`
//!   (Meinel's approximation), scaled so that it is `peak_power_w` at noon on midsummer day.
//! - **Weather**, deterministic from `seed`: in about one 10-minute block in five a cloud
//!   passes, dimming the power by 30 to 80 % in a smooth dip; each [`CELL_MS`] cell has ±3 %
//!   noise.
//! - **Energy** is the integral of that power over fixed cells of [`CELL_MS`] aligned to the
//!   Unix epoch (power is constant within a cell). The register at a time therefore depends
//!   only on the seed, a starting point (the anchor) and the time, not on when or how often it
//!   was read, and power is its derivative. It never decreases.
//! - **Voltage L1**: 230 V with a slow swing, noise, and a rise with the power fed in.
//!
//! The anchor (a cell and the register at its start) is kept in
//! `<state_dir>/meters/sim-<name>.json`, written every [`SAVE_EVERY`] and at shutdown. After a
//! restart the register is integrated forward from the anchor (up to [`MAX_CATCH_UP_MS`]): the
//! same sums in the same order, so it continues exactly where a meter that never stopped would
//! be, and production while the agent was down is counted as a real meter would have.

use std::f64::consts::PI;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use drover_protocol::reading::{Channel, ClockState, MeterId, Reading};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::clock::Clock;
use super::config::SimulatedSourceConfig;
use super::poll::Source;
use crate::fsutil::{self, FileError};

/// The integration cell: power is constant within one.
pub const CELL_MS: i64 = 2_000;
/// The anchor file is written at most this often (and at shutdown).
pub const SAVE_EVERY: Duration = Duration::from_secs(60);
/// The longest stretch integrated at once after a restart; a longer pause is skipped (the
/// register continues from where it stopped).
pub const MAX_CATCH_UP_MS: i64 = 7 * 86_400_000;
/// A cloud dip lasts one block.
const CLOUD_BLOCK_MS: i64 = 600_000;
/// The axial tilt, in degrees.
const TILT_DEG: f64 = 23.44;

/// Where the register integration starts: the register's value at the start of a cell.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Anchor {
    /// The cell (Unix milliseconds / [`CELL_MS`]).
    pub cell: i64,
    /// The register at the start of the cell, in Wh.
    pub energy_wh: f64,
}

/// The solar curve of one configured meter.
#[derive(Debug, Clone)]
pub struct SolarModel {
    peak_w: f64,
    latitude_rad: f64,
    longitude_deg: f64,
    /// [`sunlight`] at noon on midsummer day: clear-sky power there is `peak_w`.
    noon_max: f64,
    seed: u64,
}

impl SolarModel {
    /// The model for `config`.
    pub fn new(config: &SimulatedSourceConfig) -> SolarModel {
        let latitude = config.latitude.clamp(-90.0, 90.0);
        let sin_noon = if latitude.abs() <= TILT_DEG {
            1.0
        } else {
            (latitude.abs() - TILT_DEG).to_radians().cos()
        };
        SolarModel {
            peak_w: f64::from(config.peak_power_w),
            latitude_rad: latitude.to_radians(),
            longitude_deg: config.longitude,
            // Near the poles the midsummer sun stays low; keep the scale finite.
            noon_max: sunlight(sin_noon.max(0.05)),
            seed: config.seed,
        }
    }

    /// The power in W during `cell`.
    pub fn cell_power_w(&self, cell: i64) -> f64 {
        let mid_ms = cell * CELL_MS + CELL_MS / 2;
        let sin_elevation = self.sin_elevation(mid_ms);
        if sin_elevation <= 0.0 {
            return 0.0;
        }
        let clear = (sunlight(sin_elevation) / self.noon_max).min(1.0);
        let noise = 1.0 + 0.06 * (unit(self.seed, 1, cell) - 0.5);
        self.peak_w * clear * self.cloud(mid_ms) * noise
    }

    /// The voltage of phase 1 at `ts_ms` with `power_w` fed in.
    pub fn voltage_v(&self, ts_ms: i64, power_w: f64) -> f64 {
        let hours = ts_ms as f64 / 3_600_000.0;
        let swing = 2.5 * (2.0 * PI * hours / 6.0).sin();
        let noise = 0.6 * (unit(self.seed, 2, ts_ms.div_euclid(CELL_MS)) - 0.5);
        230.0 + swing + noise + 0.8 * power_w / 1_000.0
    }

    fn sin_elevation(&self, ts_ms: i64) -> f64 {
        let days = ts_ms as f64 / 86_400_000.0;
        // 1970-01-01 was day 0 of its year; the tropical year keeps the phase over decades.
        let day_of_year = days.rem_euclid(365.2422);
        let declination =
            (-TILT_DEG * (2.0 * PI * (day_of_year + 10.0) / 365.2422).cos()).to_radians();
        let solar_hours = (days.fract() * 24.0 + self.longitude_deg / 15.0).rem_euclid(24.0);
        let hour_angle = ((solar_hours - 12.0) * 15.0).to_radians();
        self.latitude_rad.sin() * declination.sin()
            + self.latitude_rad.cos() * declination.cos() * hour_angle.cos()
    }

    /// 1 under a clear sky, down to 0.2 in the middle of a thick cloud.
    fn cloud(&self, ts_ms: i64) -> f64 {
        let block = ts_ms.div_euclid(CLOUD_BLOCK_MS);
        if unit(self.seed, 3, block) >= 0.2 {
            return 1.0;
        }
        let depth = 0.3 + 0.5 * unit(self.seed, 4, block);
        let position = ts_ms.rem_euclid(CLOUD_BLOCK_MS) as f64 / CLOUD_BLOCK_MS as f64;
        1.0 - depth * (PI * position).sin().powi(2)
    }
}

/// The relative power of direct sunlight on a panel for the sun at elevation `e` (given as
/// `sin e > 0`): the sun's height times what the air mass lets through.
fn sunlight(sin_elevation: f64) -> f64 {
    let air_mass = 1.0 / sin_elevation;
    sin_elevation * 0.7f64.powf(air_mass.powf(0.678))
}

/// A deterministic number in [0, 1) for (seed, stream, index): splitmix64.
fn unit(seed: u64, stream: u64, index: i64) -> f64 {
    let mut z = seed
        .wrapping_add(stream.wrapping_mul(0xD1B5_4A32_D192_ED03))
        .wrapping_add(index.cast_unsigned().wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

/// One simulated meter: the model and its register.
#[derive(Debug, Clone)]
pub struct SimulatedMeter {
    id: MeterId,
    model: SolarModel,
    anchor: Anchor,
}

impl SimulatedMeter {
    /// A meter whose register is `anchor.energy_wh` at the start of `anchor.cell`.
    pub fn new(id: MeterId, model: SolarModel, anchor: Anchor) -> SimulatedMeter {
        SimulatedMeter { id, model, anchor }
    }

    /// A plausible starting anchor for a new meter at `now_ms`: a register of 1 to 10 MWh,
    /// chosen by the seed.
    pub fn first_anchor(seed: u64, now_ms: i64) -> Anchor {
        Anchor {
            cell: now_ms.div_euclid(CELL_MS),
            energy_wh: (1_000_000.0 + 9_000_000.0 * unit(seed, 5, 0)).floor(),
        }
    }

    /// The current anchor (to save).
    pub fn anchor(&self) -> Anchor {
        self.anchor
    }

    /// The readings at `ts_ms`: energy register (Wh), power (W) and voltage L1 (0.1 V).
    pub fn read_at(&mut self, ts_ms: i64, clock: ClockState) -> Vec<Reading> {
        let cell = ts_ms.div_euclid(CELL_MS);
        if cell - self.anchor.cell > MAX_CATCH_UP_MS / CELL_MS {
            // A very long pause: continue from the register as it was.
            self.anchor.cell = cell - MAX_CATCH_UP_MS / CELL_MS;
        }
        while self.anchor.cell < cell {
            let cell_wh = self.model.cell_power_w(self.anchor.cell) * CELL_MS as f64 / 3_600_000.0;
            self.anchor.energy_wh += cell_wh;
            self.anchor.cell += 1;
        }
        // Within the current cell (or before the anchor, if the clock went back: the register
        // then stays where it is).
        let power_w = self.model.cell_power_w(cell);
        let into_cell_ms = if cell == self.anchor.cell {
            ts_ms - cell * CELL_MS
        } else {
            0
        };
        let energy_wh = self.anchor.energy_wh + power_w * into_cell_ms as f64 / 3_600_000.0;
        let voltage_v = self.model.voltage_v(ts_ms, power_w);
        let reading = |channel, value, scale| Reading {
            meter: self.id.clone(),
            channel,
            ts_ms,
            value,
            scale,
            clock,
        };
        // All three are far inside i64: at most a 100 MW peak, registers of at most ~10^13 Wh.
        vec![
            reading(Channel::EnergyImport, energy_wh.floor() as i64, 0),
            reading(Channel::Power, power_w.round() as i64, 0),
            reading(Channel::VoltageL1, (voltage_v * 10.0).round() as i64, -1),
        ]
    }
}

/// The source around a [`SimulatedMeter`]: the clock and the anchor file.
#[derive(Debug)]
pub struct SimulatedSource {
    meter: SimulatedMeter,
    file: PathBuf,
    saved_at: Option<Instant>,
    clock: Arc<dyn Clock>,
}

/// Why a simulated meter could not start.
#[derive(Debug, thiserror::Error)]
pub enum SimulatedError {
    /// The config names an invalid meter (it skipped validation).
    #[error("invalid simulated meter: {0}")]
    Config(String),
    /// The meters directory could not be made.
    #[error(transparent)]
    File(#[from] FileError),
}

impl SimulatedSource {
    /// The source for `config`, continuing from its anchor file in `meters_dir` if there is
    /// one.
    pub fn open(
        config: &SimulatedSourceConfig,
        meters_dir: &Path,
        clock: Arc<dyn Clock>,
    ) -> Result<SimulatedSource, SimulatedError> {
        let id = config
            .meter_id()
            .map_err(|e| SimulatedError::Config(e.to_string()))?;
        fsutil::create_dir_all(meters_dir, 0o700)?;
        let file = meters_dir.join(format!("{id}.json"));
        let anchor = match fsutil::read_json::<Anchor>(&file) {
            Ok(Some(anchor)) if anchor.energy_wh.is_finite() => anchor,
            Ok(_) => SimulatedMeter::first_anchor(config.seed, clock.now_ms()),
            Err(e) => {
                tracing::warn!(error = %e, "the simulated meter's anchor is unreadable; starting anew");
                SimulatedMeter::first_anchor(config.seed, clock.now_ms())
            }
        };
        Ok(SimulatedSource {
            meter: SimulatedMeter::new(id, SolarModel::new(config), anchor),
            file,
            saved_at: None,
            clock,
        })
    }

    fn save(&mut self) {
        let anchor = self.meter.anchor();
        match fsutil::write_json_atomic(&self.file, &anchor, fsutil::PUBLIC) {
            Ok(()) => self.saved_at = Some(Instant::now()),
            // Only a simulation: the next save tries again.
            Err(e) => tracing::debug!(error = %e, "cannot save the simulated meter's anchor"),
        }
    }
}

impl Source for SimulatedSource {
    async fn poll(&mut self) -> Vec<Reading> {
        let readings = self.meter.read_at(self.clock.now_ms(), self.clock.state());
        if self.saved_at.is_none_or(|at| at.elapsed() >= SAVE_EVERY) {
            self.save();
        }
        readings
    }

    async fn stop(&mut self) {
        self.save();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2025-06-21T00:00:00Z.
    const MIDSUMMER_MS: i64 = 1_750_464_000_000;

    fn meter(seed: u64) -> SimulatedMeter {
        let config = SimulatedSourceConfig {
            name: "roof".into(),
            seed,
            ..SimulatedSourceConfig::default()
        };
        let anchor = SimulatedMeter::first_anchor(seed, MIDSUMMER_MS);
        SimulatedMeter::new(config.meter_id().unwrap(), SolarModel::new(&config), anchor)
    }

    fn value(readings: &[Reading], channel: Channel) -> i64 {
        readings
            .iter()
            .find(|r| r.channel == channel)
            .map(|r| r.value)
            .unwrap()
    }

    #[test]
    fn the_same_seed_gives_the_same_readings_and_another_seed_others() {
        let (mut a, mut b, mut c) = (meter(7), meter(7), meter(8));
        let mut differs = false;
        for step in 0..2_000 {
            let ts = MIDSUMMER_MS + step * 21_000;
            let (ra, rb) = (
                a.read_at(ts, ClockState::Synced),
                b.read_at(ts, ClockState::Synced),
            );
            assert_eq!(ra, rb);
            differs |= c.read_at(ts, ClockState::Synced) != ra;
        }
        assert!(differs);
    }

    #[test]
    fn the_register_depends_on_the_time_only_and_never_decreases() {
        let (mut often, mut once) = (meter(1), meter(1));
        let mut last = 0;
        for step in 0..(86_400 / 2) {
            let ts = MIDSUMMER_MS + step * 2_000 + 700;
            let energy = value(
                &often.read_at(ts, ClockState::Synced),
                Channel::EnergyImport,
            );
            assert!(energy >= last, "at {ts}: {energy} < {last}");
            last = energy;
        }
        let end = MIDSUMMER_MS + (86_400 / 2 - 1) * 2_000 + 700;
        assert_eq!(
            value(
                &once.read_at(end, ClockState::Synced),
                Channel::EnergyImport
            ),
            last
        );
        // A day's production for a 5 kW peak at midsummer in Sweden: tens of kWh.
        let day_wh = last
            - value(
                &meter(1).read_at(MIDSUMMER_MS, ClockState::Synced),
                Channel::EnergyImport,
            );
        assert!((15_000..45_000).contains(&day_wh), "{day_wh} Wh");
        // A clock that goes back does not make the register go back.
        let back = value(
            &often.read_at(end - 3_600_000, ClockState::Unsynced),
            Channel::EnergyImport,
        );
        assert_eq!(back, last);
    }

    #[test]
    fn power_is_the_derivative_of_energy_and_follows_the_sun() {
        let mut m = meter(3);
        // Ten minutes around local noon (longitude 17°: 10:52 UTC), read every 2 s.
        let start = MIDSUMMER_MS + 10 * 3_600_000 + 45 * 60_000;
        let first = m.read_at(start, ClockState::Synced);
        let mut integral_wh = 0.0;
        let mut ts = start;
        let mut power = value(&first, Channel::Power);
        for _ in 0..300 {
            ts += 2_000;
            let r = m.read_at(ts, ClockState::Synced);
            integral_wh += power as f64 * 2.0 / 3_600.0;
            power = value(&r, Channel::Power);
        }
        let delta_wh = (value(&m.read_at(ts, ClockState::Synced), Channel::EnergyImport)
            - value(&first, Channel::EnergyImport)) as f64;
        assert!(delta_wh > 100.0, "{delta_wh} Wh in ten minutes at noon");
        assert!(
            (delta_wh - integral_wh).abs() <= 2.0,
            "{delta_wh} vs {integral_wh}"
        );
        // Night: nothing; voltage near 230 V.
        let night = m.read_at(MIDSUMMER_MS + 23 * 3_600_000, ClockState::Synced);
        assert_eq!(value(&night, Channel::Power), 0);
        let volts = value(&night, Channel::VoltageL1);
        assert!((2_250..2_350).contains(&volts), "{volts}");
        // Noon beats morning.
        let noon = value(
            &m.read_at(MIDSUMMER_MS + 39_000_000, ClockState::Synced),
            Channel::Power,
        );
        let morning = value(
            &m.read_at(MIDSUMMER_MS + 14_400_000, ClockState::Synced),
            Channel::Power,
        );
        assert!(noon > morning && morning > 0, "{noon} {morning}");
        assert!(noon <= 5_000 * 103 / 100);
    }

    #[test]
    fn a_restart_continues_exactly_where_a_meter_that_never_stopped_would_be() {
        let dir = tempfile::tempdir().unwrap();
        let mut running = meter(9);
        let ts = MIDSUMMER_MS + 12 * 3_600_000;
        running.read_at(ts, ClockState::Synced);
        let file = dir.path().join("anchor.json");
        fsutil::write_json_atomic(&file, &running.anchor(), fsutil::PUBLIC).unwrap();
        let anchor: Anchor = fsutil::read_json(&file).unwrap().unwrap();
        let config = SimulatedSourceConfig {
            name: "roof".into(),
            seed: 9,
            ..SimulatedSourceConfig::default()
        };
        let mut restarted =
            SimulatedMeter::new(config.meter_id().unwrap(), SolarModel::new(&config), anchor);
        let later = ts + 3 * 3_600_000 + 123;
        assert_eq!(
            restarted.read_at(later, ClockState::Synced),
            running.read_at(later, ClockState::Synced)
        );
    }
}
