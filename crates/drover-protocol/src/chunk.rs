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
//! A stored blob may hold several chunks back to back (the hub appends a chunk of new rows to an
//! open row): [`decode_appended`] reads them all, finding each chunk's end by parsing it.
//!
//! ```
//! use drover_protocol::chunk::{decode_columns, encode_columns};
//! let columns = vec![vec![1_000, 3_000, 5_000], vec![7, 8, 9]];
//! let blob = encode_columns(&columns);
//! assert_eq!(decode_columns(&blob, 2).unwrap(), columns);
//! ```

use crate::batch::BatchError;
use crate::batch::bits::{BitReader, BitWriter, Effort};
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
    encode_with(columns, Effort::Smallest)
}

/// Encodes columns like [`encode_columns`], each with one fixed predictor and coder instead
/// of the smallest (see [`crate::batch::encode_quick`]): for pieces that are re-coded later.
pub fn encode_columns_quick(columns: &[Vec<i64>]) -> Vec<u8> {
    encode_with(columns, Effort::Quick)
}

fn encode_with(columns: &[Vec<i64>], effort: Effort) -> Vec<u8> {
    let rows = columns
        .iter()
        .map(Vec::len)
        .min()
        .unwrap_or(0)
        .min(MAX_ROWS);
    let count = columns.len().min(MAX_COLUMNS);
    let mut w = BitWriter::default();
    w.effort = effort;
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

/// Decodes chunks stored back to back (the store appends a chunk of new rows to an open row
/// instead of re-coding it), each holding `expected_columns` columns; returns the columns of all
/// of them, one chunk's rows after the other's. A single chunk decodes as itself.
///
/// ```
/// use drover_protocol::chunk::{decode_appended, encode_columns};
/// let mut blob = encode_columns(&[vec![1, 2], vec![10, 20]]);
/// blob.extend(encode_columns(&[vec![3], vec![30]]));
/// assert_eq!(decode_appended(&blob, 2).unwrap(), vec![vec![1, 2, 3], vec![10, 20, 30]]);
/// ```
pub fn decode_appended(bytes: &[u8], expected_columns: usize) -> Result<Vec<Vec<i64>>, BatchError> {
    let mut columns = vec![Vec::new(); expected_columns];
    let mut offset = 0;
    let mut total_rows = 0usize;
    while offset < bytes.len() {
        let rest = &bytes[offset..];
        let mut r = BitReader::new(rest, offset);
        let block = read_columns(&mut r, expected_columns)?;
        let body_len = r.align()?;
        let Some(crc) = rest.get(body_len..body_len + 4) else {
            return Err(BatchError::Truncated {
                offset: bytes.len(),
            });
        };
        let expected = u32::from_be_bytes([crc[0], crc[1], crc[2], crc[3]]);
        let actual = crc32fast::hash(&rest[..body_len]);
        if expected != actual {
            return Err(BatchError::BadChecksum { expected, actual });
        }
        total_rows += block.first().map_or(0, Vec::len);
        if total_rows > MAX_ROWS {
            return Err(BatchError::Invalid("appended chunks hold too many rows"));
        }
        for (all, part) in columns.iter_mut().zip(block) {
            all.extend(part);
        }
        offset += body_len + 4;
    }
    if offset == 0 {
        return Err(BatchError::Truncated { offset: 0 });
    }
    Ok(columns)
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
    let columns = read_columns(&mut r, expected_columns)?;
    r.finish()?;
    Ok(columns)
}

/// Reads one chunk's header and columns (not its padding or checksum).
fn read_columns(
    r: &mut BitReader<'_>,
    expected_columns: usize,
) -> Result<Vec<Vec<i64>>, BatchError> {
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
        column::read(r, rows, 0, &mut values)?;
        columns.push(values);
    }
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
        // The quick coder reads back the same, never smaller, and mixes with small pieces.
        let quick = encode_columns_quick(&columns);
        assert_eq!(decode_columns(&quick, 3).unwrap(), columns);
        assert!(quick.len() >= blob.len());
        let half = |c: &Vec<i64>, second: bool| {
            let mid = c.len() / 2;
            if second {
                c[mid..].to_vec()
            } else {
                c[..mid].to_vec()
            }
        };
        let first: Vec<Vec<i64>> = columns.iter().map(|c| half(c, false)).collect();
        let second: Vec<Vec<i64>> = columns.iter().map(|c| half(c, true)).collect();
        let mixed = [encode_columns(&first), encode_columns_quick(&second)].concat();
        assert_eq!(decode_appended(&mixed, 3).unwrap(), columns);
    }

    #[test]
    fn appended_chunks_decode_in_order_and_damage_is_caught() {
        let a = encode_columns(&[vec![1, 2, 3], vec![-5, 0, 5]]);
        let b = encode_columns(&[vec![4], vec![i64::MAX]]);
        let c = encode_columns(&[vec![], vec![]]);
        let boundaries = [a.len(), a.len() + b.len()];
        let blob = [a.clone(), b, c].concat();
        assert_eq!(
            decode_appended(&blob, 2).unwrap(),
            vec![vec![1, 2, 3, 4], vec![-5, 0, 5, i64::MAX]]
        );
        assert_eq!(
            decode_appended(&a, 2).unwrap(),
            decode_columns(&a, 2).unwrap()
        );
        for cut in 0..blob.len() {
            // Cutting at a boundary between chunks leaves valid (shorter) data; anywhere else
            // is an error.
            if boundaries.contains(&cut) {
                continue;
            }
            assert!(decode_appended(&blob[..cut], 2).is_err(), "cut at {cut}");
        }
        for i in 0..blob.len() {
            let mut flipped = blob.clone();
            flipped[i] ^= 0x04;
            assert!(decode_appended(&flipped, 2).is_err(), "flip at {i}");
        }
        assert!(decode_appended(&blob, 3).is_err());
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
