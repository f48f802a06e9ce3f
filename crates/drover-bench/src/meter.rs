//! The telemetry the data benchmarks send: the protocol crate's synthetic solar meter (three
//! channels polled every 2 s, the signal of telemetry-anchors §2.3), moved in time so that it
//! lies just before now (the hub refuses readings from the future and deletes raw data past
//! retention), and continued hour after hour.

use std::time::{SystemTime, UNIX_EPOCH};

use drover_protocol::batch::synthetic;
use drover_protocol::reading::{Channel, Reading};

/// One hour, in milliseconds.
pub const HOUR_MS: i64 = 3_600_000;
/// Polls of the meter per hour (one every 2 s).
pub const POLLS_PER_HOUR: usize = 1800;
/// Readings per poll: energy, power, voltage.
pub const CHANNELS: usize = 3;

/// One meter's readings, an hour at a time. Hour `i` is the synthetic meter's first hour moved
/// to start at `first_hour_ms + i` hours, with its energy register continued from the hour
/// before, so that the register never steps backwards (which the hub would flag).
#[derive(Debug, Clone)]
pub struct Meter {
    template: Vec<Reading>,
    first_hour_ms: i64,
    /// How much the energy register rises in an hour (Wh, scaled like the register).
    rise: i64,
}

impl Meter {
    /// The meter determined by `seed`, whose hour 0 starts at `first_hour_ms`.
    pub fn new(seed: u64, first_hour_ms: i64) -> Meter {
        let template = synthetic::solar_meter(seed, POLLS_PER_HOUR);
        let energy: Vec<i64> = template
            .iter()
            .filter(|r| r.channel == Channel::EnergyImport)
            .map(|r| r.value)
            .collect();
        let rise = match (energy.first(), energy.last()) {
            (Some(first), Some(last)) => last - first + 1,
            _ => 0,
        };
        Meter {
            template,
            first_hour_ms,
            rise,
        }
    }

    /// The readings of hour `i`, poll by poll (energy, power, voltage of each poll in turn).
    pub fn hour(&self, i: u32) -> Vec<Reading> {
        let shift = self.first_hour_ms - synthetic::START_MS + i64::from(i) * HOUR_MS;
        let energy_offset = i64::from(i) * self.rise;
        self.template
            .iter()
            .map(|r| {
                let mut r = r.clone();
                r.ts_ms += shift;
                if r.channel == Channel::EnergyImport {
                    r.value += energy_offset;
                }
                r
            })
            .collect()
    }
}

/// The start of the first of `hours` whole hours that end before the current hour, so that
/// `hours` hours of data lie in the past.
pub fn first_hour_ending_now(hours: u32) -> i64 {
    (now_ms().div_euclid(HOUR_MS) - i64::from(hours)) * HOUR_MS
}

/// The channel's place among the meter's three (0 to 2), for the reference stores' series IDs.
pub fn channel_index(channel: Channel) -> i64 {
    match channel {
        Channel::EnergyImport => 0,
        Channel::Power => 1,
        _ => 2,
    }
}

/// The current time in Unix milliseconds.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hours_follow_each_other_and_the_register_never_steps_back() {
        let meter = Meter::new(3, 1_000 * HOUR_MS);
        let (a, b) = (meter.hour(0), meter.hour(1));
        assert_eq!(a.len(), POLLS_PER_HOUR * CHANNELS);
        assert!(
            a.iter()
                .all(|r| r.ts_ms >= 1_000 * HOUR_MS && r.ts_ms < 1_001 * HOUR_MS)
        );
        assert!(
            b.iter()
                .all(|r| r.ts_ms >= 1_001 * HOUR_MS && r.ts_ms < 1_002 * HOUR_MS)
        );
        let energy = |rs: &[Reading]| -> Vec<i64> {
            rs.iter()
                .filter(|r| r.channel == Channel::EnergyImport)
                .map(|r| r.value)
                .collect()
        };
        let joined: Vec<i64> = [energy(&a), energy(&b)].concat();
        assert!(joined.windows(2).all(|w| w[1] >= w[0]));
    }
}
