//! Register maps: where a meter model keeps its serial number and its values, as data.
//!
//! The seed hard-coded three meter models in a table, so a new model needed a code release
//! (seed weakness 15). Here a map is a small TOML file; the seed's three are built in
//! (`meter-maps/` beside `Cargo.toml`, embedded in the binary) and a config names one of them
//! or a file. `drover-agent modbus probe` dumps registers for writing a new one.
//!
//! A gateway exposes its meters in **slots**: slot `n`'s registers start at `n × slot_offset`,
//! and every `offset` below is relative to that start.
//!
//! ```toml
//! name = "my-meter"                # for logs
//! description = "..."              # optional
//! registers = "holding"            # "holding" (function 3, default) or "input" (function 4)
//! slot_offset = 260                # registers from one slot to the next
//!
//! [serial]                         # the meter's serial number: its identity, modbus-<serial>
//! offset = 10
//! words = 2                        # 1 to 4 registers (default 2)
//! word_order = "big"               # "big": high word first (default); "little": low first
//!
//! [[channel]]                      # one per value; at least one
//! channel = "energy_import"        # a reading channel: energy_import, power, voltage_l1, ...
//! offset = 260
//! words = 4                        # 1 to 4 registers, read whole (all 64 bits when 4)
//! word_order = "big"
//! signed = false                   # two's complement (default false)
//! factor = 1                       # raw × factor = value (default 1)
//! scale = 0                        # value × 10^scale is in the channel's unit (-3..=3, default 0)
//!
//! [[channel]]                      # for example an instantaneous power in tenths of a watt
//! channel = "power"
//! offset = 30
//! words = 2
//! signed = true
//! scale = -1
//! ```
//!
//! A slot is **empty** when its serial number is 0 or all ones (0xFFFFFFFF for two words; the
//! seed's newer gateways answered that).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use drover_protocol::reading::Channel;
use serde::{Deserialize, Serialize};

/// The most registers one Modbus read may ask for.
pub const MAX_REGISTERS_PER_READ: u16 = 125;

/// Reads are merged when the gap between them is at most this many registers: one slightly
/// larger request is cheaper than two round trips to a gateway.
const MERGE_GAP: u16 = 32;

/// The built-in maps: (name, TOML text).
const BUILT_IN: [(&str, &str); 3] = [
    ("sec", include_str!("../../../meter-maps/sec.toml")),
    ("gav", include_str!("../../../meter-maps/gav.toml")),
    ("eastron", include_str!("../../../meter-maps/eastron.toml")),
];

/// The names of the built-in maps.
pub fn built_in_names() -> impl Iterator<Item = &'static str> {
    BUILT_IN.iter().map(|(name, _)| *name)
}

/// Which Modbus table a map's registers are in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RegisterKind {
    /// Holding registers (function code 3).
    #[default]
    Holding,
    /// Input registers (function code 4).
    Input,
}

/// The order of the 16-bit registers in a multi-register value. Within a register the bytes
/// are always big-endian (Modbus says so).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WordOrder {
    /// The most significant register first.
    #[default]
    Big,
    /// The least significant register first.
    Little,
}

/// A meter model's registers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterMap {
    /// The map's name, for logs.
    pub name: String,
    /// What the map is for.
    #[serde(default)]
    pub description: String,
    /// Holding or input registers.
    #[serde(default)]
    pub registers: RegisterKind,
    /// Registers from one slot to the next.
    pub slot_offset: u16,
    /// The serial number.
    pub serial: SerialField,
    /// The values.
    #[serde(rename = "channel")]
    pub channels: Vec<ChannelField>,
}

/// Where the serial number is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialField {
    /// From the slot's first register.
    pub offset: u16,
    /// How many registers (1 to 4).
    #[serde(default = "two")]
    pub words: u16,
    /// Their order.
    #[serde(default)]
    pub word_order: WordOrder,
}

/// Where one channel's value is, and how to scale it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelField {
    /// What the value is.
    pub channel: Channel,
    /// From the slot's first register.
    pub offset: u16,
    /// How many registers (1 to 4).
    #[serde(default = "two")]
    pub words: u16,
    /// Their order.
    #[serde(default)]
    pub word_order: WordOrder,
    /// Two's complement.
    #[serde(default)]
    pub signed: bool,
    /// The raw value times this is the reading's value.
    #[serde(default = "one")]
    pub factor: i64,
    /// The reading's decimal exponent.
    #[serde(default)]
    pub scale: i8,
}

fn two() -> u16 {
    2
}

fn one() -> i64 {
    1
}

/// Why a map could not be used.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    /// The config names no built-in map and no file.
    #[error(
        "no built-in register map is called {name:?} (built in: sec, gav, eastron; a file path must contain '/')"
    )]
    Unknown {
        /// The name given.
        name: String,
    },
    /// The map file could not be read.
    #[error("cannot read the register map {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// The map is not valid TOML for a map.
    #[error("the register map {origin} is not valid: {source}")]
    Parse {
        /// The file or built-in name.
        origin: String,
        /// The parser's error, with line and column.
        source: toml::de::Error,
    },
    /// A value in the map is out of range.
    #[error("the register map {origin}: {message}")]
    Invalid {
        /// The file or built-in name.
        origin: String,
        /// What is wrong.
        message: String,
    },
}

/// Why a register value could not be turned into a reading value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The value does not fit a signed 64-bit reading value (after the factor).
    #[error("register value {raw} (× {factor}) does not fit a 64-bit signed value")]
    OutOfRange {
        /// The unsigned register value.
        raw: u64,
        /// The map's factor.
        factor: i64,
    },
}

impl RegisterMap {
    /// A built-in map (`sec`, `gav`, `eastron`; any case) or, when `spec` contains a `/` or
    /// ends in `.toml`, the map file at that path.
    pub fn resolve(spec: &str) -> Result<RegisterMap, MapError> {
        if spec.contains('/') || spec.ends_with(".toml") {
            return RegisterMap::load(Path::new(spec));
        }
        let (name, text) = BUILT_IN
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(spec))
            .ok_or_else(|| MapError::Unknown {
                name: spec.chars().take(80).collect(),
            })?;
        RegisterMap::parse(text, &format!("built-in {name:?}"))
    }

    /// Reads a map file.
    pub fn load(path: &Path) -> Result<RegisterMap, MapError> {
        let text = std::fs::read_to_string(path).map_err(|source| MapError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        RegisterMap::parse(&text, &path.display().to_string())
    }

    /// Parses and validates map text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<RegisterMap, MapError> {
        let map: RegisterMap = toml::from_str(text).map_err(|source| MapError::Parse {
            origin: origin.to_string(),
            source,
        })?;
        map.validate().map_err(|message| MapError::Invalid {
            origin: origin.to_string(),
            message,
        })?;
        Ok(map)
    }

    fn validate(&self) -> Result<(), String> {
        if self.name.trim().is_empty() {
            return Err("`name` must not be empty".into());
        }
        if self.slot_offset == 0 {
            return Err("`slot_offset` must be at least 1".into());
        }
        check_words("serial", self.serial.offset, self.serial.words)?;
        if self.channels.is_empty() {
            return Err("at least one [[channel]] is needed".into());
        }
        let mut seen = HashSet::new();
        for field in &self.channels {
            let name = field.channel.name();
            if !seen.insert(field.channel) {
                return Err(format!("channel {name:?} appears twice"));
            }
            check_words(name, field.offset, field.words)?;
            if field.factor < 1 {
                return Err(format!("channel {name:?}: `factor` must be at least 1"));
            }
            if !(-3..=3).contains(&field.scale) {
                return Err(format!("channel {name:?}: `scale` must be in -3..=3"));
            }
        }
        Ok(())
    }

    /// The register blocks one read of a slot needs (serial and every channel), as
    /// `(offset from the slot's start, count)`, each at most [`MAX_REGISTERS_PER_READ`] long.
    pub fn blocks(&self) -> Vec<(u16, u16)> {
        let mut ranges: Vec<(u16, u16)> = std::iter::once((self.serial.offset, self.serial.words))
            .chain(self.channels.iter().map(|c| (c.offset, c.words)))
            .collect();
        ranges.sort_unstable();
        let mut blocks: Vec<(u16, u16)> = Vec::new();
        for (offset, words) in ranges {
            let end = u32::from(offset) + u32::from(words);
            if let Some((start, count)) = blocks.last_mut() {
                let last_end = u32::from(*start) + u32::from(*count);
                let merged = end.max(last_end) - u32::from(*start);
                if u32::from(offset) <= last_end + u32::from(MERGE_GAP)
                    && merged <= u32::from(MAX_REGISTERS_PER_READ)
                {
                    // `merged` is at most MAX_REGISTERS_PER_READ, so it fits.
                    *count = u16::try_from(merged).unwrap_or(MAX_REGISTERS_PER_READ);
                    continue;
                }
            }
            blocks.push((offset, words));
        }
        blocks
    }

    /// The first register of `slot`, or `None` past the 16-bit register space.
    pub fn slot_start(&self, slot: u16) -> Option<u16> {
        let start = u32::from(slot) * u32::from(self.slot_offset);
        let last = self
            .blocks()
            .iter()
            .map(|(offset, count)| u32::from(*offset) + u32::from(*count))
            .max()
            .unwrap_or(0);
        if start + last > 0x1_0000 {
            return None;
        }
        u16::try_from(start).ok()
    }
}

fn check_words(what: &str, offset: u16, words: u16) -> Result<(), String> {
    if !(1..=4).contains(&words) {
        return Err(format!("{what}: `words` must be 1 to 4"));
    }
    if u32::from(offset) + u32::from(words) > 0x1_0000 {
        return Err(format!("{what}: `offset` is past the register space"));
    }
    Ok(())
}

/// The registers read from one slot, by offset from the slot's start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SlotRegisters {
    blocks: Vec<(u16, Vec<u16>)>,
}

impl SlotRegisters {
    /// Adds a block read at `offset`.
    pub fn push(&mut self, offset: u16, words: Vec<u16>) {
        self.blocks.push((offset, words));
    }

    /// `words` registers from `offset`, if they were read.
    pub fn get(&self, offset: u16, words: u16) -> Option<&[u16]> {
        self.blocks.iter().find_map(|(start, block)| {
            let from = usize::from(offset.checked_sub(*start)?);
            block.get(from..from + usize::from(words))
        })
    }
}

/// Joins registers into one unsigned value.
pub fn join_words(words: &[u16], order: WordOrder) -> u64 {
    let fold = |acc: u64, w: &u16| (acc << 16) | u64::from(*w);
    match order {
        WordOrder::Big => words.iter().fold(0, fold),
        WordOrder::Little => words.iter().rev().fold(0, fold),
    }
}

/// Whether a serial number marks an empty slot: 0, or all ones for its width.
pub fn is_empty_serial(serial: u64, words: u16) -> bool {
    let all_ones = match words {
        0 => 0,
        w if w >= 4 => u64::MAX,
        w => (1u64 << (16 * u32::from(w))) - 1,
    };
    serial == 0 || serial == all_ones
}

impl ChannelField {
    /// The reading value for this field's registers (`words.len() == self.words`).
    pub fn decode(&self, words: &[u16]) -> Result<i64, DecodeError> {
        let raw = join_words(words, self.word_order);
        let bits = 16 * u32::try_from(words.len()).unwrap_or(4);
        let out_of_range = || DecodeError::OutOfRange {
            raw,
            factor: self.factor,
        };
        let value = if self.signed && bits < 64 {
            // Sign-extend from `bits`.
            let shift = 64 - bits;
            (raw << shift).cast_signed() >> shift
        } else if self.signed {
            raw.cast_signed()
        } else {
            i64::try_from(raw).map_err(|_| out_of_range())?
        };
        value.checked_mul(self.factor).ok_or_else(out_of_range)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seed_maps_are_built_in_with_the_seed_numbers() {
        // (name, slot offset, energy offset, factor): the seed's manufacturer table.
        let expected = [
            ("sec", 260, 260, 1),
            ("gav", 260, 20, 100),
            ("eastron", 130, 20, 10),
        ];
        for (name, slot_offset, base, factor) in expected {
            let map = RegisterMap::resolve(name).unwrap();
            assert_eq!(map.slot_offset, slot_offset, "{name}");
            assert_eq!((map.serial.offset, map.serial.words), (10, 2), "{name}");
            assert_eq!(map.serial.word_order, WordOrder::Big);
            let energy = &map.channels[0];
            assert_eq!(energy.channel, Channel::EnergyImport);
            assert_eq!((energy.offset, energy.words), (base, 4), "{name}");
            assert_eq!(energy.factor, factor, "{name}");
            assert_eq!(energy.scale, 0);
        }
        assert_eq!(RegisterMap::resolve("Eastron").unwrap().name, "eastron");
        assert_eq!(built_in_names().count(), 3);
    }

    #[test]
    fn reads_are_planned_in_as_few_blocks_as_fit() {
        // GAV: serial 10..12 and energy 20..24 in one read; SEC: 10..12 and 260..264 apart.
        assert_eq!(
            RegisterMap::resolve("gav").unwrap().blocks(),
            vec![(10, 14)]
        );
        assert_eq!(
            RegisterMap::resolve("sec").unwrap().blocks(),
            vec![(10, 2), (260, 4)]
        );
        let sec = RegisterMap::resolve("sec").unwrap();
        assert_eq!(sec.slot_start(2), Some(520));
        assert_eq!(sec.slot_start(251), Some(65_260));
        assert_eq!(sec.slot_start(252), None, "past the 16-bit register space");
    }

    #[test]
    fn values_use_all_64_bits_and_both_word_orders() {
        let field = |words, word_order, signed, factor| ChannelField {
            channel: Channel::EnergyImport,
            offset: 0,
            words,
            word_order,
            signed,
            factor,
            scale: 0,
        };
        let big = field(4, WordOrder::Big, false, 1);
        // The seed dropped the top two bytes; 0x0001_0000_0000_0005 must stay itself.
        assert_eq!(big.decode(&[0x0001, 0, 0, 5]), Ok(0x0001_0000_0000_0005));
        assert_eq!(
            big.decode(&[0x1234, 0x5678, 0x9abc, 0xdef0]),
            Ok(0x1234_5678_9abc_def0)
        );
        let little = field(4, WordOrder::Little, false, 1);
        assert_eq!(little.decode(&[5, 0, 0, 0x0001]), Ok(0x0001_0000_0000_0005));
        assert!(matches!(
            big.decode(&[0x8000, 0, 0, 0]),
            Err(DecodeError::OutOfRange { .. })
        ));
        assert!(
            field(4, WordOrder::Big, false, 100)
                .decode(&[0x7fff, 0, 0, 0])
                .is_err()
        );
        assert_eq!(
            field(2, WordOrder::Big, true, 1).decode(&[0xffff, 0xfffe]),
            Ok(-2)
        );
        assert_eq!(
            field(1, WordOrder::Big, true, 10).decode(&[0x8000]),
            Ok(-327_680)
        );
        assert_eq!(
            field(2, WordOrder::Big, false, 100).decode(&[0, 7]),
            Ok(700)
        );
    }

    #[test]
    fn empty_serials_are_zero_or_all_ones() {
        assert!(is_empty_serial(0, 2));
        assert!(is_empty_serial(0xFFFF_FFFF, 2));
        assert!(!is_empty_serial(0xFFFF_FFFF, 3));
        assert!(is_empty_serial(u64::MAX, 4));
        assert!(!is_empty_serial(12_345_678, 2));
        assert_eq!(join_words(&[0x00bc, 0x614e], WordOrder::Big), 12_345_678);
    }

    #[test]
    fn slot_registers_are_found_by_offset() {
        let mut regs = SlotRegisters::default();
        regs.push(10, vec![1, 2, 3, 4]);
        regs.push(260, vec![5, 6]);
        assert_eq!(regs.get(11, 2), Some(&[2, 3][..]));
        assert_eq!(regs.get(260, 2), Some(&[5, 6][..]));
        assert_eq!(regs.get(12, 4), None);
        assert_eq!(regs.get(9, 1), None);
    }

    #[test]
    fn bad_maps_are_refused_with_the_reason() {
        let good = RegisterMap::resolve("sec").unwrap();
        let text = toml::to_string(&good).unwrap();
        assert_eq!(RegisterMap::parse(&text, "t").unwrap(), good);
        let cases = [
            (
                text.replace("slot_offset = 260", "slot_offset = 0"),
                "slot_offset",
            ),
            (text.replace("words = 4", "words = 5"), "words"),
            (text.replace("factor = 1", "factor = 0"), "factor"),
            (text.replace("factor = 1", "factor = 1\nscale = 4"), "scale"),
            (
                text.replace("name = \"sec\"", "name = \"sec\"\nbogus = 1"),
                "bogus",
            ),
            (
                text.replace("\"energy_import\"", "\"energy_imported\""),
                "energy_imported",
            ),
        ];
        for (text, needle) in cases {
            let err = RegisterMap::parse(&text, "t").unwrap_err().to_string();
            assert!(err.contains(needle), "{needle}: {err}");
        }
        let err = RegisterMap::resolve("abb").unwrap_err().to_string();
        assert!(err.contains("sec, gav, eastron"), "{err}");
        let err = RegisterMap::resolve("/nonexistent/map.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/map.toml"), "{err}");
    }
}
