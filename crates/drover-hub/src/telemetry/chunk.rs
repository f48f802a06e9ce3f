//! Points and rollup buckets as stored blobs, in the protocol crate's chunk format.
//!
//! A stored blob is one chunk or several appended back to back: the writer appends a chunk of
//! just the new points (or buckets) to an open row rather than re-coding the whole row for every
//! batch, and re-codes a row as one chunk when it has grown too many pieces or its window is over
//! (see `store::ingest`). Decoding takes any number of pieces: points come out sorted (the writer
//! only appends points later than the row's last), and buckets of the same start that were
//! appended separately are merged.

use drover_protocol::chunk::{decode_appended, encode_columns, encode_columns_quick};

use super::fold::Point;
use super::rollup::{Bucket, merge_into};
use crate::store::StoreError;

/// A chunk of points: time, value and clock-state columns.
pub fn encode_points(points: &[Point]) -> Vec<u8> {
    encode_columns(&point_columns(points))
}

/// A chunk of points coded quickly rather than small (see `batch::encode_quick`): for pieces
/// appended to a row that is re-coded later.
pub fn encode_points_quick(points: &[Point]) -> Vec<u8> {
    encode_columns_quick(&point_columns(points))
}

fn point_columns(points: &[Point]) -> [Vec<i64>; 3] {
    [
        points.iter().map(|p| p.ts).collect(),
        points.iter().map(|p| p.value).collect(),
        points.iter().map(|p| i64::from(p.clock)).collect(),
    ]
}

/// The points of a chunk (or of several appended), sorted by time.
pub fn decode_points(bytes: &[u8]) -> Result<Vec<Point>, StoreError> {
    let columns =
        decode_appended(bytes, 3).map_err(|e| StoreError::Corrupt(format!("chunk: {e}")))?;
    let [ts, values, clocks] = <[Vec<i64>; 3]>::try_from(columns)
        .map_err(|_| StoreError::Corrupt("chunk: wrong column count".into()))?;
    let mut points: Vec<Point> = ts
        .into_iter()
        .zip(values)
        .zip(clocks)
        .map(|((ts, value), clock)| Point {
            ts,
            value,
            clock: u8::try_from(clock).unwrap_or(2),
        })
        .collect();
    if !points.is_sorted_by_key(|p| p.ts) {
        // Never written so; cheap insurance for readers that binary-search.
        points.sort_by_key(|p| p.ts);
    }
    Ok(points)
}

/// A row of rollup buckets: one column per field.
pub fn encode_buckets(buckets: &[Bucket]) -> Vec<u8> {
    let column = |f: fn(&Bucket) -> i64| buckets.iter().map(f).collect::<Vec<i64>>();
    encode_columns(&[
        column(|b| b.start),
        column(|b| b.count),
        column(|b| b.sum),
        column(|b| b.min),
        column(|b| b.max),
        column(|b| b.first_ts),
        column(|b| b.first),
        column(|b| b.last_ts),
        column(|b| b.last),
    ])
}

/// The buckets of a rollup row (of several appended pieces, merged), sorted by start.
pub fn decode_buckets(bytes: &[u8]) -> Result<Vec<Bucket>, StoreError> {
    let columns =
        decode_appended(bytes, 9).map_err(|e| StoreError::Corrupt(format!("rollup: {e}")))?;
    let n = columns.first().map_or(0, Vec::len);
    let pieces: Vec<Bucket> = (0..n)
        .map(|i| Bucket {
            start: columns[0][i],
            count: columns[1][i],
            sum: columns[2][i],
            min: columns[3][i],
            max: columns[4][i],
            first_ts: columns[5][i],
            first: columns[6][i],
            last_ts: columns[7][i],
            last: columns[8][i],
        })
        .collect();
    if pieces.is_sorted_by(|a, b| a.start < b.start) {
        return Ok(pieces);
    }
    let mut buckets = Vec::with_capacity(pieces.len());
    merge_into(&mut buckets, &pieces);
    Ok(buckets)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::rollup::{Resolution, aggregate};

    #[test]
    fn points_and_buckets_round_trip() {
        let points: Vec<Point> = (0..100)
            .map(|i| Point {
                ts: 1_000_000 + i * 2_000,
                value: 5_000 + i * 3,
                clock: 0,
            })
            .collect();
        assert_eq!(decode_points(&encode_points(&points)).unwrap(), points);
        let pairs: Vec<(i64, i64)> = points.iter().map(|p| (p.ts, p.value)).collect();
        let buckets = aggregate(&pairs, Resolution::Minute);
        assert_eq!(decode_buckets(&encode_buckets(&buckets)).unwrap(), buckets);
        assert!(decode_points(b"nonsense").is_err());
    }

    #[test]
    fn appended_pieces_read_as_one_row() {
        let points: Vec<Point> = (0..90)
            .map(|i| Point {
                ts: 1_000_000 + i * 2_000,
                value: 5_000 + i * 3,
                clock: 0,
            })
            .collect();
        let blob: Vec<u8> = points
            .chunks(30)
            .flat_map(encode_points)
            .collect::<Vec<u8>>();
        assert_eq!(decode_points(&blob).unwrap(), points);
        // Buckets of one minute appended in three pieces merge into what aggregating the whole
        // gives.
        let pairs: Vec<(i64, i64)> = points.iter().map(|p| (p.ts, p.value)).collect();
        let blob: Vec<u8> = pairs
            .chunks(7)
            .flat_map(|piece| encode_buckets(&aggregate(piece, Resolution::Minute)))
            .collect();
        assert_eq!(
            decode_buckets(&blob).unwrap(),
            aggregate(&pairs, Resolution::Minute)
        );
    }
}
