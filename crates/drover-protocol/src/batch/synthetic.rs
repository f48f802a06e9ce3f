//! A deterministic synthetic meter, for tests, fuzz seeds and benchmarks of the batch format:
//! the signal of telemetry-anchors §2.3, so that bytes-per-point figures can be compared with
//! the ones measured there.
//!
//! One Modbus meter polled every 2 s (with 0–4 ms of jitter) on three channels:
//! - power in 0.1 W: a random walk with σ = 3 W per poll between 0.2 and 5.4 kW, with a load
//!   step of up to ±1 kW on one poll in 150;
//! - the imported-energy register in Wh, the integral of that power, so it rises by 0–3 Wh per
//!   poll;
//! - voltage of phase 1 in 0.1 V: 230 V with noise of σ = 0.4 V.
//!
//! The random numbers come from SplitMix64 and normal deviates from the sum of twelve uniforms,
//! using only exact arithmetic, so a seed gives the same readings on every platform.
//!
//! ```
//! use drover_protocol::batch::synthetic;
//!
//! let readings = synthetic::solar_meter(7, 30);
//! assert_eq!(readings.len(), 90);
//! assert_eq!(readings, synthetic::solar_meter(7, 30));
//! ```

use crate::reading::{Channel, ClockState, MeterId, Reading};

/// When the first poll happens (Unix ms; May 2026).
pub const START_MS: i64 = 1_780_000_000_000;

/// The meter's ID.
pub const METER: &str = "modbus-12345678";

/// The readings of `polls` polls of the synthetic meter (three per poll, poll by poll),
/// determined by `seed`.
pub fn solar_meter(seed: u64, polls: usize) -> Vec<Reading> {
    let Ok(meter) = MeterId::parse(METER) else {
        return Vec::new();
    };
    let mut rng = SplitMix64(seed);
    let mut power_dw = 30_000.0f64;
    let mut energy_wh = 12_345_678.0f64;
    let mut previous_ms = START_MS;
    let mut out = Vec::with_capacity(polls * 3);
    for poll in 0..polls {
        let ts_ms = START_MS + 2000 * poll as i64 + rng.below(5) as i64;
        power_dw += 30.0 * rng.normal();
        if rng.below(150) == 0 {
            power_dw += (rng.unit() - 0.5) * 20_000.0;
        }
        power_dw = power_dw.clamp(2_000.0, 54_000.0);
        energy_wh += power_dw / 10.0 * (ts_ms - previous_ms) as f64 / 3_600_000.0;
        previous_ms = ts_ms;
        let voltage_dv = 2300.0 + 4.0 * rng.normal();
        let reading = |channel, value: f64, scale| Reading {
            meter: meter.clone(),
            channel,
            ts_ms,
            value: value as i64,
            scale,
            clock: ClockState::Synced,
        };
        out.push(reading(Channel::EnergyImport, energy_wh.floor(), 0));
        out.push(reading(Channel::Power, power_dw.round(), -1));
        out.push(reading(Channel::VoltageL1, voltage_dv.round(), -1));
    }
    out
}

/// SplitMix64 (Steele, Lea and Flood, 2014): tiny, fast and good enough for test signals.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (with a negligible bias for small `n`).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Approximately standard normal: the sum of twelve uniforms, minus six.
    fn normal(&mut self) -> f64 {
        (0..12).map(|_| self.unit()).sum::<f64>() - 6.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signal_has_the_documented_shape() {
        let readings = solar_meter(1, 1800);
        let of =
            |c: Channel| -> Vec<&Reading> { readings.iter().filter(|r| r.channel == c).collect() };
        let energy = of(Channel::EnergyImport);
        for w in energy.windows(2) {
            let rise = w[1].value - w[0].value;
            assert!((0..=3).contains(&rise), "energy rose by {rise}");
            let gap = w[1].ts_ms - w[0].ts_ms;
            assert!((1996..=2004).contains(&gap), "polls {gap} ms apart");
        }
        let voltage = of(Channel::VoltageL1);
        let mean = voltage.iter().map(|r| r.value as f64).sum::<f64>() / 1800.0;
        let sd = (voltage
            .iter()
            .map(|r| (r.value as f64 - mean).powi(2))
            .sum::<f64>()
            / 1800.0)
            .sqrt();
        assert!(
            (2295.0..2305.0).contains(&mean) && (3.5..4.5).contains(&sd),
            "{mean} {sd}"
        );
        assert!(
            of(Channel::Power)
                .iter()
                .all(|r| (2_000..=54_000).contains(&r.value))
        );
    }
}
