//! Meter readings: what a device measured, with whose meter, which channel, which unit, when,
//! and how far its clock could be trusted at the time.
//!
//! Values are **scaled integers** (`value × 10^scale` in the channel's unit), never floats: a
//! meter reports decimal quantities (an energy register in Wh, power in tenths of a watt), and
//! integers keep them exact through compression, storage and sums. A cumulative register
//! (energy, pulses) is sent as the register's value, not as a difference, so that a lost batch
//! loses resolution, never energy.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// What a reading measures. The code (`as u8`) is what travels in a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[repr(u8)]
pub enum Channel {
    /// Imported active energy: a cumulative register, in Wh.
    EnergyImport = 1,
    /// Exported active energy: a cumulative register, in Wh.
    EnergyExport = 2,
    /// Active power, in W (negative when exporting).
    Power = 3,
    /// Voltage of phase 1, in V.
    VoltageL1 = 4,
    /// Voltage of phase 2, in V.
    VoltageL2 = 5,
    /// Voltage of phase 3, in V.
    VoltageL3 = 6,
    /// Current of phase 1, in A.
    CurrentL1 = 7,
    /// Current of phase 2, in A.
    CurrentL2 = 8,
    /// Current of phase 3, in A.
    CurrentL3 = 9,
    /// Grid frequency, in Hz.
    Frequency = 10,
    /// A cumulative pulse count (S0 input), unitless.
    Pulses = 11,
    /// Energy counted in the interval that ends at the reading's time, in Wh (not cumulative):
    /// what the seed's pulse meters reported as energy events.
    EnergyInterval = 12,
}

/// Every channel, in code order.
pub const CHANNELS: [Channel; 12] = [
    Channel::EnergyImport,
    Channel::EnergyExport,
    Channel::Power,
    Channel::VoltageL1,
    Channel::VoltageL2,
    Channel::VoltageL3,
    Channel::CurrentL1,
    Channel::CurrentL2,
    Channel::CurrentL3,
    Channel::Frequency,
    Channel::Pulses,
    Channel::EnergyInterval,
];

/// The unit of a channel's values (before scaling).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Unit {
    /// Watt-hours.
    WattHour,
    /// Watts.
    Watt,
    /// Volts.
    Volt,
    /// Amperes.
    Ampere,
    /// Hertz.
    Hertz,
    /// A count.
    Count,
}

impl Unit {
    /// The unit's symbol (`Wh`, `W`, ...), empty for a count.
    pub fn symbol(self) -> &'static str {
        match self {
            Unit::WattHour => "Wh",
            Unit::Watt => "W",
            Unit::Volt => "V",
            Unit::Ampere => "A",
            Unit::Hertz => "Hz",
            Unit::Count => "",
        }
    }
}

impl Channel {
    /// The wire code.
    pub fn code(self) -> u8 {
        self as u8
    }

    /// The channel for a wire code.
    pub fn from_code(code: u8) -> Option<Channel> {
        CHANNELS.iter().copied().find(|c| c.code() == code)
    }

    /// The channel's name in APIs and config (`energy_import`, `power`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Channel::EnergyImport => "energy_import",
            Channel::EnergyExport => "energy_export",
            Channel::Power => "power",
            Channel::VoltageL1 => "voltage_l1",
            Channel::VoltageL2 => "voltage_l2",
            Channel::VoltageL3 => "voltage_l3",
            Channel::CurrentL1 => "current_l1",
            Channel::CurrentL2 => "current_l2",
            Channel::CurrentL3 => "current_l3",
            Channel::Frequency => "frequency",
            Channel::Pulses => "pulses",
            Channel::EnergyInterval => "energy_interval",
        }
    }

    /// The channel with a name.
    pub fn parse(name: &str) -> Option<Channel> {
        CHANNELS.iter().copied().find(|c| c.name() == name)
    }

    /// The unit of its values.
    pub fn unit(self) -> Unit {
        match self {
            Channel::EnergyImport | Channel::EnergyExport | Channel::EnergyInterval => {
                Unit::WattHour
            }
            Channel::Power => Unit::Watt,
            Channel::VoltageL1 | Channel::VoltageL2 | Channel::VoltageL3 => Unit::Volt,
            Channel::CurrentL1 | Channel::CurrentL2 | Channel::CurrentL3 => Unit::Ampere,
            Channel::Frequency => Unit::Hertz,
            Channel::Pulses => Unit::Count,
        }
    }

    /// Whether it is a cumulative register (energy is the difference of two readings), as
    /// opposed to an instantaneous value.
    pub fn is_cumulative(self) -> bool {
        matches!(
            self,
            Channel::EnergyImport | Channel::EnergyExport | Channel::Pulses
        )
    }
}

/// How far the device's clock could be trusted when a reading was taken. A Raspberry Pi has no
/// real-time clock: after a power cut it boots in the past until it reaches a time source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[repr(u8)]
pub enum ClockState {
    /// The clock was synchronised (NTP, or set from the hub) since boot.
    Synced = 0,
    /// The clock has not been synchronised since boot: timestamps may be far off.
    Unsynced = 1,
    /// The device cannot tell.
    Unknown = 2,
}

impl ClockState {
    /// The state for a wire code.
    pub fn from_code(code: u8) -> Option<ClockState> {
        match code {
            0 => Some(ClockState::Synced),
            1 => Some(ClockState::Unsynced),
            2 => Some(ClockState::Unknown),
            _ => None,
        }
    }
}

/// A meter's identity within a device: its own serial number where it has one
/// (`modbus-12345678`), else a name from the agent's config (`s0-heatpump`, `sim-1`). 1 to 64
/// characters of letters, digits, `-`, `_`, `.` and `:`. Shared, not copied: every reading of a
/// meter holds the same text, so a clone costs no allocation.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct MeterId(Arc<str>);

/// Why a string is not a meter ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("meter IDs are 1 to 64 letters, digits, '-', '_', '.' or ':' (got {0:?})")]
pub struct BadMeterId(pub String);

impl MeterId {
    /// Parses a meter ID.
    pub fn parse(text: &str) -> Result<MeterId, BadMeterId> {
        let ok = !text.is_empty()
            && text.len() <= 64
            && text
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'));
        if ok {
            Ok(MeterId(Arc::from(text)))
        } else {
            Err(BadMeterId(text.chars().take(80).collect()))
        }
    }

    /// The ID as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for MeterId {
    type Error = BadMeterId;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        MeterId::parse(&value)
    }
}

impl From<MeterId> for String {
    fn from(value: MeterId) -> String {
        value.0.to_string()
    }
}

impl std::fmt::Display for MeterId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// One measurement.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Reading {
    /// The meter.
    pub meter: MeterId,
    /// What was measured.
    pub channel: Channel,
    /// When, by the device's clock (Unix milliseconds).
    pub ts_ms: i64,
    /// The value is `value × 10^scale` in the channel's unit.
    pub value: i64,
    /// The decimal exponent of `value` (-3 ..= 3).
    pub scale: i8,
    /// How far the clock could be trusted.
    pub clock: ClockState,
}

impl Reading {
    /// The value as a float in the channel's unit (for display, never for sums).
    pub fn as_f64(&self) -> f64 {
        self.value as f64 * 10f64.powi(i32::from(self.scale))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_codes_and_names_round_trip() {
        for c in CHANNELS {
            assert_eq!(Channel::from_code(c.code()), Some(c));
            assert_eq!(Channel::parse(c.name()), Some(c));
        }
        assert_eq!(Channel::from_code(0), None);
        assert_eq!(Channel::from_code(200), None);
        assert!(Channel::EnergyImport.is_cumulative());
        assert!(!Channel::Power.is_cumulative());
        assert_eq!(Channel::VoltageL2.unit().symbol(), "V");
    }

    #[test]
    fn meter_ids_are_validated() {
        assert!(MeterId::parse("modbus-12345678").is_ok());
        assert!(MeterId::parse("s0:heat.pump_1").is_ok());
        assert!(MeterId::parse("").is_err());
        assert!(MeterId::parse("a/b").is_err());
        assert!(MeterId::parse(&"x".repeat(65)).is_err());
    }

    #[test]
    fn scaled_values_read_back() {
        let r = Reading {
            meter: MeterId::parse("m").unwrap(),
            channel: Channel::Power,
            ts_ms: 0,
            value: 12_345,
            scale: -1,
            clock: ClockState::Synced,
        };
        assert!((r.as_f64() - 1234.5).abs() < 1e-9);
    }
}
