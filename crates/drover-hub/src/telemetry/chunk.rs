//! Points and rollup buckets as stored blobs, in the protocol crate's chunk format.

use drover_protocol::chunk::{decode_columns, encode_columns};

use super::fold::Point;
use super::rollup::Bucket;
use crate::store::StoreError;

/// A chunk of points: time, value and clock-state columns.
pub fn encode_points(points: &[Point]) -> Vec<u8> {
    encode_columns(&[
        points.iter().map(|p| p.ts).collect(),
        points.iter().map(|p| p.value).collect(),
        points.iter().map(|p| i64::from(p.clock)).collect(),
    ])
}

/// The points of a chunk.
pub fn decode_points(bytes: &[u8]) -> Result<Vec<Point>, StoreError> {
    let columns =
        decode_columns(bytes, 3).map_err(|e| StoreError::Corrupt(format!("chunk: {e}")))?;
    let [ts, values, clocks] = <[Vec<i64>; 3]>::try_from(columns)
        .map_err(|_| StoreError::Corrupt("chunk: wrong column count".into()))?;
    Ok(ts
        .into_iter()
        .zip(values)
        .zip(clocks)
        .map(|((ts, value), clock)| Point {
            ts,
            value,
            clock: u8::try_from(clock).unwrap_or(2),
        })
        .collect())
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

/// The buckets of a rollup row.
pub fn decode_buckets(bytes: &[u8]) -> Result<Vec<Bucket>, StoreError> {
    let columns =
        decode_columns(bytes, 9).map_err(|e| StoreError::Corrupt(format!("rollup: {e}")))?;
    let n = columns.first().map_or(0, Vec::len);
    Ok((0..n)
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
        .collect())
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
}
