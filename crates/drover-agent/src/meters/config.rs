//! `[meters]` in the agent config: one array per kind of source.
//!
//! ```toml
//! [[meters.modbus]]      # a Modbus TCP gateway with its meters (one source per gateway)
//! [[meters.s0]]          # an S0 pulse input on a GPIO line
//! [[meters.command]]     # a program that prints readings
//! [[meters.simulated]]   # a simulated solar meter (drover demo)
//! ```
//!
//! Like the rest of the config: unknown keys are refused, defaults are the constants below, and
//! [`MetersConfig::validate`] runs with [`crate::AgentConfig::validate`]. Every source has a
//! `name`, unique among all sources; it names the source in logs, and for S0 and simulated
//! meters (which have no serial number of their own) it is the meter ID (`s0-<name>`,
//! `sim-<name>`).

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use drover_protocol::reading::{BadMeterId, MeterId};
use serde::{Deserialize, Serialize};

use super::modbus::maps::RegisterMap;
use crate::duration::format_duration;

/// How often a source is polled unless configured otherwise.
pub const DEFAULT_METER_INTERVAL: Duration = Duration::from_secs(2);
/// No source may be polled more often than this.
pub const MIN_METER_INTERVAL: Duration = Duration::from_millis(100);
/// The Modbus TCP port.
pub const DEFAULT_MODBUS_PORT: u16 = 502;
/// The Modbus unit ID the seed's gateways answered on.
pub const DEFAULT_MODBUS_UNIT: u8 = 1;
/// The map used when a Modbus source names none: the seed's default meters.
pub const DEFAULT_MODBUS_MAP: &str = "sec";
/// How long one Modbus request may take.
pub const DEFAULT_MODBUS_TIMEOUT: Duration = Duration::from_secs(3);
/// How long connecting to a gateway may take.
pub const DEFAULT_MODBUS_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How many slots discovery walks at most.
pub const DEFAULT_MAX_SLOTS: u16 = 64;
/// How often the slots of a gateway are walked again, to find added or replaced meters.
pub const DEFAULT_REDISCOVER_EVERY: Duration = Duration::from_secs(3600);
/// The wait before a discovery that could not finish is tried again.
pub const DEFAULT_DISCOVERY_RETRY: Duration = Duration::from_secs(30);
/// S0 debounce: a level counts once it has been stable this long.
pub const DEFAULT_DEBOUNCE: Duration = Duration::from_millis(20);
/// Energy per S0 pulse (1000 impulses per kWh).
pub const DEFAULT_WH_PER_PULSE: f64 = 1.0;
/// The S0 counter file is written at most this often (and at shutdown).
pub const DEFAULT_S0_SAVE_EVERY: Duration = Duration::from_secs(5);
/// The GPIO chip S0 inputs are on unless configured otherwise.
pub const DEFAULT_GPIO_CHIP: &str = "/dev/gpiochip0";
/// How long a command source's program may run.
pub const DEFAULT_COMMAND_SOURCE_TIMEOUT: Duration = Duration::from_secs(10);
/// A simulated meter's clear-sky power at noon on midsummer day.
pub const DEFAULT_PEAK_POWER_W: u32 = 5_000;
/// Where a simulated meter's sun shines (Nyköping, Sweden, where the seed fleet began).
pub const DEFAULT_LATITUDE: f64 = 58.75;
/// See [`DEFAULT_LATITUDE`].
pub const DEFAULT_LONGITUDE: f64 = 17.0;

/// `[meters]`: every meter source of the device.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetersConfig {
    /// Modbus TCP gateways.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub modbus: Vec<ModbusSourceConfig>,
    /// S0 pulse inputs.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub s0: Vec<S0SourceConfig>,
    /// Programs that print readings.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<CommandSourceConfig>,
    /// Simulated solar meters.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub simulated: Vec<SimulatedSourceConfig>,
}

/// `[[meters.modbus]]`: a gateway and the meters in its slots.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModbusSourceConfig {
    /// The source's name, for logs.
    pub name: String,
    /// The gateway's host name or address. (Required.)
    pub host: String,
    /// Its TCP port.
    pub port: u16,
    /// The Modbus unit ID.
    pub unit: u8,
    /// A built-in register map (`sec`, `gav`, `eastron`) or a map file (a path with a `/`).
    pub map: String,
    /// How often the meters are read.
    #[serde(with = "crate::duration::text")]
    pub interval: Duration,
    /// How long one request may take; then the connection is opened again.
    #[serde(with = "crate::duration::text")]
    pub timeout: Duration,
    /// How long connecting may take.
    #[serde(with = "crate::duration::text")]
    pub connect_timeout: Duration,
    /// Read exactly these slots (skipping empty ones) instead of walking from slot 0 to the
    /// first empty slot.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slots: Option<Vec<u16>>,
    /// How far the walk goes at most.
    pub max_slots: u16,
    /// How often the slots are walked again.
    #[serde(with = "crate::duration::text")]
    pub rediscover_every: Duration,
    /// The wait before a discovery that failed is tried again.
    #[serde(with = "crate::duration::text")]
    pub discovery_retry: Duration,
}

impl Default for ModbusSourceConfig {
    fn default() -> ModbusSourceConfig {
        ModbusSourceConfig {
            name: String::new(),
            host: String::new(),
            port: DEFAULT_MODBUS_PORT,
            unit: DEFAULT_MODBUS_UNIT,
            map: DEFAULT_MODBUS_MAP.to_string(),
            interval: DEFAULT_METER_INTERVAL,
            timeout: DEFAULT_MODBUS_TIMEOUT,
            connect_timeout: DEFAULT_MODBUS_CONNECT_TIMEOUT,
            slots: None,
            max_slots: DEFAULT_MAX_SLOTS,
            rediscover_every: DEFAULT_REDISCOVER_EVERY,
            discovery_retry: DEFAULT_DISCOVERY_RETRY,
        }
    }
}

/// Which edge of the line starts a pulse.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActiveLevel {
    /// The pulse pulls the line low (an S0 output's transistor against a pull-up).
    #[default]
    Low,
    /// The pulse drives the line high.
    High,
}

/// The line's bias resistor.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BiasSetting {
    /// Pull-up (for an open-collector S0 output).
    #[default]
    PullUp,
    /// Pull-down.
    PullDown,
    /// None: the circuit provides it.
    Disabled,
}

/// `[[meters.s0]]`: a pulse input.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct S0SourceConfig {
    /// The meter's name; its ID is `s0-<name>`. (Required.)
    pub name: String,
    /// The GPIO character device.
    pub chip: PathBuf,
    /// The line offset on the chip. (Required.)
    pub line: u32,
    /// The level of the line during a pulse.
    pub active: ActiveLevel,
    /// The bias resistor to ask for.
    pub bias: BiasSetting,
    /// A level counts only once it has been stable this long.
    #[serde(with = "crate::duration::text")]
    pub debounce: Duration,
    /// Energy per pulse in Wh, with at most 3 decimals (1000 imp/kWh is 1, 800 imp/kWh 1.25).
    pub wh_per_pulse: f64,
    /// How often readings are made.
    #[serde(with = "crate::duration::text")]
    pub interval: Duration,
    /// The counter file is written at most this often (and at shutdown).
    #[serde(with = "crate::duration::text")]
    pub save_every: Duration,
}

impl Default for S0SourceConfig {
    fn default() -> S0SourceConfig {
        S0SourceConfig {
            name: String::new(),
            chip: PathBuf::from(DEFAULT_GPIO_CHIP),
            line: u32::MAX,
            active: ActiveLevel::default(),
            bias: BiasSetting::default(),
            debounce: DEFAULT_DEBOUNCE,
            wh_per_pulse: DEFAULT_WH_PER_PULSE,
            interval: DEFAULT_METER_INTERVAL,
            save_every: DEFAULT_S0_SAVE_EVERY,
        }
    }
}

/// `[[meters.command]]`: a program that prints readings (see [`crate::meters::command`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CommandSourceConfig {
    /// The source's name, for logs. (Required.)
    pub name: String,
    /// A shell command line, run with `sh -c`. (Required.)
    pub command: String,
    /// How often it runs.
    #[serde(with = "crate::duration::text")]
    pub interval: Duration,
    /// How long it may run; then its process group is killed.
    #[serde(with = "crate::duration::text")]
    pub timeout: Duration,
}

impl Default for CommandSourceConfig {
    fn default() -> CommandSourceConfig {
        CommandSourceConfig {
            name: String::new(),
            command: String::new(),
            interval: DEFAULT_METER_INTERVAL,
            timeout: DEFAULT_COMMAND_SOURCE_TIMEOUT,
        }
    }
}

/// `[[meters.simulated]]`: a solar production meter that is not there.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SimulatedSourceConfig {
    /// The meter's name; its ID is `sim-<name>`. (Required.)
    pub name: String,
    /// Clear-sky power at noon on midsummer day, in W.
    pub peak_power_w: u32,
    /// Where the sun is: latitude in degrees (north positive).
    pub latitude: f64,
    /// Longitude in degrees (east positive); it sets the local noon.
    pub longitude: f64,
    /// The seed of the weather (clouds and noise); the same seed gives the same curve.
    pub seed: u64,
    /// How often readings are made.
    #[serde(with = "crate::duration::text")]
    pub interval: Duration,
}

impl Default for SimulatedSourceConfig {
    fn default() -> SimulatedSourceConfig {
        SimulatedSourceConfig {
            name: String::new(),
            peak_power_w: DEFAULT_PEAK_POWER_W,
            latitude: DEFAULT_LATITUDE,
            longitude: DEFAULT_LONGITUDE,
            seed: 0,
            interval: DEFAULT_METER_INTERVAL,
        }
    }
}

/// What is wrong with a `[meters]` section: the array and a message naming the source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    /// The array, such as `meters.modbus`.
    pub field: &'static str,
    /// What is wrong, naming the source.
    pub message: String,
}

impl MetersConfig {
    /// Whether no source is configured.
    pub fn is_empty(&self) -> bool {
        self.modbus.is_empty()
            && self.s0.is_empty()
            && self.command.is_empty()
            && self.simulated.is_empty()
    }

    /// Checks every source. Map files named by Modbus sources are read and checked too, so that
    /// a broken map stops the agent at start, not silently at the first poll.
    pub fn validate(&self) -> Result<(), Invalid> {
        let mut names = HashSet::new();
        let mut check_name = |field: &'static str, name: &str| {
            if name.trim().is_empty() {
                return Err(invalid(field, "every source needs a `name`".into()));
            }
            if !names.insert(name.to_string()) {
                return Err(invalid(field, format!("the name {name:?} is used twice")));
            }
            Ok(())
        };
        for s in &self.modbus {
            check_name("meters.modbus", &s.name)?;
            s.validate()
                .map_err(|m| invalid("meters.modbus", format!("{:?}: {m}", s.name)))?;
        }
        for s in &self.s0 {
            check_name("meters.s0", &s.name)?;
            s.validate()
                .map_err(|m| invalid("meters.s0", format!("{:?}: {m}", s.name)))?;
        }
        for s in &self.command {
            check_name("meters.command", &s.name)?;
            s.validate()
                .map_err(|m| invalid("meters.command", format!("{:?}: {m}", s.name)))?;
        }
        for s in &self.simulated {
            check_name("meters.simulated", &s.name)?;
            s.validate()
                .map_err(|m| invalid("meters.simulated", format!("{:?}: {m}", s.name)))?;
        }
        Ok(())
    }
}

fn invalid(field: &'static str, message: String) -> Invalid {
    Invalid { field, message }
}

fn at_least(key: &str, value: Duration, min: Duration) -> Result<(), String> {
    if value < min {
        return Err(format!(
            "`{key}` must be at least {} (got {})",
            format_duration(min),
            format_duration(value)
        ));
    }
    Ok(())
}

impl ModbusSourceConfig {
    fn validate(&self) -> Result<(), String> {
        if self.host.trim().is_empty() {
            return Err("`host` is required".into());
        }
        if self.port == 0 {
            return Err("`port` must not be 0".into());
        }
        RegisterMap::resolve(&self.map).map_err(|e| e.to_string())?;
        at_least("interval", self.interval, MIN_METER_INTERVAL)?;
        at_least("timeout", self.timeout, Duration::from_millis(10))?;
        at_least(
            "connect_timeout",
            self.connect_timeout,
            Duration::from_millis(10),
        )?;
        at_least(
            "rediscover_every",
            self.rediscover_every,
            Duration::from_secs(1),
        )?;
        at_least("discovery_retry", self.discovery_retry, MIN_METER_INTERVAL)?;
        match &self.slots {
            Some(slots) if slots.is_empty() => {
                Err("`slots` must list at least one slot (leave it out to walk from slot 0)".into())
            }
            None if self.max_slots == 0 => Err("`max_slots` must be at least 1".into()),
            _ => Ok(()),
        }
    }

    /// The meter ID for a serial number read from a meter: `modbus-<serial>`.
    pub fn meter_id(serial: u64) -> MeterId {
        MeterId::parse(&format!("modbus-{serial}"))
            .expect("`modbus-` and at most 20 digits is a valid meter ID")
    }
}

impl S0SourceConfig {
    fn validate(&self) -> Result<(), String> {
        self.meter_id().map_err(|e| format!("`name`: {e}"))?;
        if self.line == u32::MAX {
            return Err("`line` (the GPIO line offset) is required".into());
        }
        if self.chip.as_os_str().is_empty() {
            return Err("`chip` must name a GPIO character device".into());
        }
        self.energy_per_pulse()?;
        at_least("interval", self.interval, MIN_METER_INTERVAL)?;
        at_least("save_every", self.save_every, MIN_METER_INTERVAL)?;
        if self.debounce > Duration::from_secs(1) {
            return Err("`debounce` must be at most 1s".into());
        }
        Ok(())
    }

    /// `wh_per_pulse` as a scaled integer `(value, scale)`: `1.25` is `(125, -2)`.
    pub fn energy_per_pulse(&self) -> Result<(i64, i8), String> {
        let wh = self.wh_per_pulse;
        if !(wh.is_finite() && wh > 0.0 && wh <= 1e6) {
            return Err("`wh_per_pulse` must be above 0 and at most 1000000".into());
        }
        for decimals in 0..=3_i8 {
            let scaled = wh * 10f64.powi(i32::from(decimals));
            let rounded = scaled.round();
            if (scaled - rounded).abs() < 1e-6 {
                // At most 1e9, so the cast is exact.
                return Ok((rounded as i64, -decimals));
            }
        }
        Err(format!(
            "`wh_per_pulse` may have at most 3 decimals (got {wh})"
        ))
    }

    /// The meter's ID, `s0-<name>` (an error only for a config that skipped validation).
    pub fn meter_id(&self) -> Result<MeterId, BadMeterId> {
        MeterId::parse(&format!("s0-{}", self.name))
    }
}

impl CommandSourceConfig {
    fn validate(&self) -> Result<(), String> {
        if self.command.trim().is_empty() {
            return Err("`command` is required".into());
        }
        at_least("interval", self.interval, MIN_METER_INTERVAL)?;
        at_least("timeout", self.timeout, Duration::from_millis(10))
    }
}

impl SimulatedSourceConfig {
    fn validate(&self) -> Result<(), String> {
        self.meter_id().map_err(|e| format!("`name`: {e}"))?;
        if self.peak_power_w == 0 || self.peak_power_w > 100_000_000 {
            return Err("`peak_power_w` must be 1 to 100000000".into());
        }
        if !(-90.0..=90.0).contains(&self.latitude) {
            return Err("`latitude` must be within -90..=90".into());
        }
        if !(-180.0..=180.0).contains(&self.longitude) {
            return Err("`longitude` must be within -180..=180".into());
        }
        at_least("interval", self.interval, MIN_METER_INTERVAL)
    }

    /// The meter's ID, `sim-<name>` (an error only for a config that skipped validation).
    pub fn meter_id(&self) -> Result<MeterId, BadMeterId> {
        MeterId::parse(&format!("sim-{}", self.name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<MetersConfig, String> {
        let config: MetersConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        config
            .validate()
            .map_err(|e| format!("{}: {}", e.field, e.message))?;
        Ok(config)
    }

    #[test]
    fn defaults_fill_what_is_missing() {
        let config = parse(
            "[[modbus]]\nname = 'gw'\nhost = '10.0.0.2'\n\
             [[s0]]\nname = 'heatpump'\nline = 17\n\
             [[command]]\nname = 'inv'\ncommand = 'read-inverter'\n\
             [[simulated]]\nname = 'roof'\n",
        )
        .unwrap();
        let modbus = &config.modbus[0];
        assert_eq!((modbus.port, modbus.unit), (502, 1));
        assert_eq!(modbus.map, "sec");
        assert_eq!(modbus.interval, Duration::from_secs(2));
        assert_eq!(config.s0[0].debounce, Duration::from_millis(20));
        assert_eq!(config.s0[0].meter_id().unwrap().as_str(), "s0-heatpump");
        assert_eq!(config.command[0].timeout, DEFAULT_COMMAND_SOURCE_TIMEOUT);
        assert_eq!(config.simulated[0].peak_power_w, 5_000);
        assert_eq!(config.simulated[0].meter_id().unwrap().as_str(), "sim-roof");
        assert_eq!(
            ModbusSourceConfig::meter_id(12_345_678).as_str(),
            "modbus-12345678"
        );
    }

    #[test]
    fn bad_sources_are_refused_with_the_source_named() {
        let cases = [
            ("[[modbus]]\nhost = 'h'", "needs a `name`"),
            ("[[modbus]]\nname = 'a'", "`host`"),
            ("[[modbus]]\nname = 'a'\nhost = 'h'\nmap = 'abb'", "abb"),
            (
                "[[modbus]]\nname = 'a'\nhost = 'h'\nmap = './nope.toml'",
                "nope.toml",
            ),
            (
                "[[modbus]]\nname = 'a'\nhost = 'h'\ninterval = '10ms'",
                "interval",
            ),
            ("[[modbus]]\nname = 'a'\nhost = 'h'\nslots = []", "slots"),
            ("[[modbus]]\nname = 'a'\nhost = 'h'\nhots = 'x'", "hots"),
            ("[[s0]]\nname = 'a'", "line"),
            ("[[s0]]\nname = 'a b'\nline = 1", "name"),
            (
                "[[s0]]\nname = 'a'\nline = 1\nwh_per_pulse = 0.3125",
                "3 decimals",
            ),
            (
                "[[s0]]\nname = 'a'\nline = 1\nwh_per_pulse = -1.0",
                "wh_per_pulse",
            ),
            ("[[command]]\nname = 'a'", "command"),
            ("[[simulated]]\nname = 'a'\nlatitude = 91.0", "latitude"),
            (
                "[[simulated]]\nname = 'a'\n[[command]]\nname = 'a'\ncommand = 'x'",
                "twice",
            ),
        ];
        for (text, needle) in cases {
            let err = parse(text).unwrap_err();
            assert!(err.contains(needle), "{text}: {err}");
        }
    }

    #[test]
    fn energy_per_pulse_is_exact() {
        let s0 = |wh_per_pulse| S0SourceConfig {
            wh_per_pulse,
            ..S0SourceConfig::default()
        };
        assert_eq!(s0(1.0).energy_per_pulse(), Ok((1, 0)));
        assert_eq!(s0(1.25).energy_per_pulse(), Ok((125, -2)));
        assert_eq!(s0(0.5).energy_per_pulse(), Ok((5, -1)));
        assert_eq!(s0(0.001).energy_per_pulse(), Ok((1, -3)));
        assert_eq!(s0(10.0).energy_per_pulse(), Ok((10, 0)));
    }
}
