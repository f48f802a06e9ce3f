//! The hub's storage format for columns of integers: a chunk of one series' points (time,
//! value, clock state) or of its rollup buckets is stored as one blob in this format.
//!
//! It reuses the batch codec's column coder (each column gets the cheapest of four predictors
//! and three coders, see [`crate::batch`]), so points cost at rest about what they cost on the
//! wire, well under the 1.5 bytes a point the store aims for. Layout:
//!
//! ```text
//! version   8 bits   = 1
//! rows      ue       number of rows (≤ MAX_ROWS)
//! columns   ue       number of columns (≤ MAX_COLUMNS)
//! column*            each column as the batch column coder writes it (origin 0)
//! padding            zero bits to the byte
//! crc32     32 bits  CRC-32 (IEEE) of everything before, big-endian
//! ```
//!
//! ```
//! use drover_protocol::chunk::{decode_columns, encode_columns};
//! let columns = vec![vec![1_000, 3_000, 5_000], vec![7, 8, 9]];
//! let blob = encode_columns(&columns);
//! assert_eq!(decode_columns(&blob, 2).unwrap(), columns);
//! ```

use crate::batch::BatchError;
use crate::batch::bits::{BitReader, BitWriter};
use crate::batch::column;

/// The chunk format version.
pub const CHUNK_VERSION: u8 = 1;
/// The most rows a chunk may hold.
pub const MAX_ROWS: usize = 1 << 20;
/// The most columns a chunk may hold.
pub const MAX_COLUMNS: usize = 64;

/// Encodes columns of equal length.
///
/// Columns of unequal length are a caller bug; the shortest length is used.
pub fn encode_columns(columns: &[Vec<i64>]) -> Vec<u8> {
    let rows = columns
        .iter()
        .map(Vec::len)
        .min()
        .unwrap_or(0)
        .min(MAX_ROWS);
    let count = columns.len().min(MAX_COLUMNS);
    let mut w = BitWriter::default();
    w.bits(8, u64::from(CHUNK_VERSION));
    w.ue(rows as u64);
    w.ue(count as u64);
    for values in columns.iter().take(count) {
        column::write(&mut w, &values[..rows], 0);
    }
    let mut bytes = w.finish();
    let crc = crc32fast::hash(&bytes);
    bytes.extend_from_slice(&crc.to_be_bytes());
    bytes
}

/// Decodes a chunk that must hold `expected_columns` columns.
pub fn decode_columns(bytes: &[u8], expected_columns: usize) -> Result<Vec<Vec<i64>>, BatchError> {
    let Some(body_len) = bytes.len().checked_sub(4) else {
        return Err(BatchError::Truncated {
            offset: bytes.len(),
        });
    };
    let (body, crc) = bytes.split_at(body_len);
    let expected = u32::from_be_bytes([crc[0], crc[1], crc[2], crc[3]]);
    let actual = crc32fast::hash(body);
    if expected != actual {
        return Err(BatchError::BadChecksum { expected, actual });
    }
    let mut r = BitReader::new(body, 0);
    let version = r.bits(8)? as u8;
    if version != CHUNK_VERSION {
        return Err(BatchError::UnsupportedVersion(version));
    }
    let rows = r.ue(MAX_ROWS as u64, || {
        BatchError::Invalid("a chunk declares too many rows")
    })? as usize;
    let count = r.ue(MAX_COLUMNS as u64, || {
        BatchError::Invalid("a chunk declares too many columns")
    })? as usize;
    if count != expected_columns {
        return Err(BatchError::Invalid(
            "a chunk holds an unexpected number of columns",
        ));
    }
    let mut columns = Vec::with_capacity(count);
    for _ in 0..count {
        // A column needs at least a few bits per row; refuse counts the input cannot hold
        // before allocating for them.
        if rows > 0 && r.remaining() < 2 {
            return Err(r.truncated());
        }
        let mut values = Vec::new();
        column::read(&mut r, rows, 0, &mut values)?;
        columns.push(values);
    }
    r.finish()?;
    Ok(columns)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn points_round_trip_and_stay_small() {
        let readings = crate::batch::synthetic::solar_meter(7, 1800);
        let power: Vec<&crate::reading::Reading> = readings
            .iter()
            .filter(|r| r.channel == crate::reading::Channel::Power)
            .collect();
        let columns = vec![
            power.iter().map(|r| r.ts_ms).collect::<Vec<_>>(),
            power.iter().map(|r| r.value).collect(),
            power.iter().map(|r| r.clock as i64).collect(),
        ];
        let blob = encode_columns(&columns);
        assert_eq!(decode_columns(&blob, 3).unwrap(), columns);
        let per_point = blob.len() as f64 / power.len() as f64;
        assert!(per_point < 1.5, "{per_point:.2} bytes per point at rest");
    }

    #[test]
    fn damage_is_an_error_not_a_panic() {
        let blob = encode_columns(&[vec![1, 2, 3], vec![i64::MIN, 0, i64::MAX]]);
        assert_eq!(
            decode_columns(&blob, 2).unwrap()[1],
            vec![i64::MIN, 0, i64::MAX]
        );
        for cut in 0..blob.len() {
            assert!(decode_columns(&blob[..cut], 2).is_err());
        }
        let mut flipped = blob.clone();
        flipped[3] ^= 0x10;
        assert!(matches!(
            decode_columns(&flipped, 2),
            Err(BatchError::BadChecksum { .. })
        ));
        assert!(decode_columns(&blob, 3).is_err());
        assert_eq!(
            decode_columns(&encode_columns(&[]), 0).unwrap(),
            Vec::<Vec<i64>>::new()
        );
    }
}
