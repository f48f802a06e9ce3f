//! `drover-agent modbus probe`: dumps a range of registers with the usual interpretations of
//! each, for writing the register map of a new meter model (the seed had a manual script for
//! this, `test/readRegisters.js`).
//!
//! One line per register: its address, hex, u16 and i16, then the values that start at it
//! when it is the first of two registers (u32 high word first, u32 low word first, f32 high
//! word first) or of four (u64 high word first). A meter's serial number or energy register is
//! usually easy to spot in one of the columns.

use std::fmt::Write as _;

use super::link::{Endpoint, Link, LinkError};
use super::maps::{MAX_REGISTERS_PER_READ, RegisterKind, WordOrder, join_words};

/// The most registers one probe dumps.
pub const MAX_PROBE_COUNT: u16 = 4_000;

/// What to read.
#[derive(Debug, Clone)]
pub struct Probe {
    /// The gateway or meter.
    pub endpoint: Endpoint,
    /// Holding or input registers.
    pub kind: RegisterKind,
    /// The first register.
    pub start: u16,
    /// How many.
    pub count: u16,
}

/// Why a probe failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The range is empty, too long, or runs past register 65535.
    #[error(
        "--count must be 1 to {MAX_PROBE_COUNT} and the range must end at register 65535 or before"
    )]
    Range,
    /// Reading failed.
    #[error("reading registers {start}..{end} from {endpoint}: {source}")]
    Read {
        /// The gateway.
        endpoint: String,
        /// The block's first register.
        start: u16,
        /// One past its last.
        end: u32,
        /// What went wrong.
        source: LinkError,
    },
}

/// Reads the registers (in blocks of at most [`MAX_REGISTERS_PER_READ`], over one
/// connection).
pub async fn read(probe: &Probe) -> Result<Vec<u16>, ProbeError> {
    let end = u32::from(probe.start) + u32::from(probe.count);
    if probe.count == 0 || probe.count > MAX_PROBE_COUNT || end > 0x1_0000 {
        return Err(ProbeError::Range);
    }
    let mut link = Link::new(probe.endpoint.clone());
    let mut words = Vec::with_capacity(usize::from(probe.count));
    let mut next = u32::from(probe.start);
    while next < end {
        let count = (end - next).min(u32::from(MAX_REGISTERS_PER_READ));
        // Both fit: `next < end <= 0x10000` and `count <= 125`.
        let (start, n) = (
            u16::try_from(next).map_err(|_| ProbeError::Range)?,
            u16::try_from(count).map_err(|_| ProbeError::Range)?,
        );
        let block = link
            .read(probe.kind, start, n)
            .await
            .map_err(|source| ProbeError::Read {
                endpoint: probe.endpoint.to_string(),
                start,
                end: next + count,
                source,
            })?;
        words.extend_from_slice(&block[..usize::from(n)]);
        next += count;
    }
    Ok(words)
}

/// The dump of `words` read from register `start` on, with a header line.
pub fn format(probe: &Probe, words: &[u16]) -> String {
    let kind = match probe.kind {
        RegisterKind::Holding => "holding",
        RegisterKind::Input => "input",
    };
    let last = u32::from(probe.start) + u32::try_from(words.len()).unwrap_or(0);
    let mut out = format!(
        "# {}: {kind} registers {}..{last}\n",
        probe.endpoint, probe.start
    );
    let _ = writeln!(
        out,
        "# {:>5}  {:>6}  {:>5}  {:>6}  {:>10}  {:>10}  {:>20}  {:>14}",
        "reg", "hex", "u16", "i16", "u32 hi-lo", "u32 lo-hi", "u64 hi-first", "f32 hi-lo"
    );
    for (i, word) in words.iter().enumerate() {
        let address = u32::from(probe.start) + u32::try_from(i).unwrap_or(0);
        let pair = words.get(i..i + 2);
        let quad = words.get(i..i + 4);
        let dash = || "-".to_string();
        let u32_big = pair.map_or_else(dash, |p| join_words(p, WordOrder::Big).to_string());
        let u32_little = pair.map_or_else(dash, |p| join_words(p, WordOrder::Little).to_string());
        let u64_big = quad.map_or_else(dash, |q| join_words(q, WordOrder::Big).to_string());
        let f32_big = pair.map_or_else(dash, |p| {
            let bits = u32::try_from(join_words(p, WordOrder::Big)).unwrap_or(0);
            float(f32::from_bits(bits))
        });
        let _ = writeln!(
            out,
            "  {address:>5}  0x{word:04x}  {word:>5}  {:>6}  {u32_big:>10}  {u32_little:>10}  {u64_big:>20}  {f32_big:>14}",
            word.cast_signed()
        );
    }
    out
}

/// A float that could plausibly be a measurement, or `-` for the noise most bit patterns are.
fn float(value: f32) -> String {
    let magnitude = value.abs();
    if value == 0.0 {
        "0".into()
    } else if value.is_finite() && (1e-4..1e10).contains(&magnitude) {
        format!("{value:.4}")
    } else {
        "-".into()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn probe(start: u16, count: u16) -> Probe {
        Probe {
            endpoint: Endpoint {
                host: "127.0.0.1".into(),
                port: 1,
                unit: 1,
                connect_timeout: Duration::from_secs(1),
                timeout: Duration::from_secs(1),
            },
            kind: RegisterKind::Holding,
            start,
            count,
        }
    }

    #[test]
    fn each_register_shows_its_interpretations() {
        // 0x00bc614e = 12345678; 230.5 as f32 = 0x43668000.
        let words = [0x00bc, 0x614e, 0x4366, 0x8000];
        let text = format(&probe(10, 4), &words);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 6, "{text}");
        assert!(lines[0].contains("holding registers 10..14"), "{text}");
        let first: Vec<&str> = lines[2].split_whitespace().collect();
        assert_eq!(
            first[..5],
            ["10", "0x00bc", "188", "188", "12345678"],
            "{text}"
        );
        assert_eq!(first[6], (0x00bc_614e_4366_8000u64).to_string());
        let third: Vec<&str> = lines[4].split_whitespace().collect();
        assert_eq!(third[3], "17254", "{text}");
        assert_eq!(third[7], "230.5000", "{text}");
        // The last register starts no pair.
        let last: Vec<&str> = lines[5].split_whitespace().collect();
        assert_eq!(last[3], "-32768", "{text}");
        assert_eq!(last[4..], ["-", "-", "-", "-"], "{text}");
    }

    #[tokio::test]
    async fn bad_ranges_are_refused_before_connecting() {
        assert!(matches!(read(&probe(0, 0)).await, Err(ProbeError::Range)));
        assert!(matches!(
            read(&probe(65_535, 2)).await,
            Err(ProbeError::Range)
        ));
        assert!(matches!(
            read(&probe(0, MAX_PROBE_COUNT + 1)).await,
            Err(ProbeError::Range)
        ));
    }
}
