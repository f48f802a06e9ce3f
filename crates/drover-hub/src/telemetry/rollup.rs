//! Rollups: per-bucket aggregates of a series at 1 minute, 1 hour and 1 day, kept up to date as
//! points arrive, as pure functions over plain data.
//!
//! A bucket holds count, sum, minimum, maximum, and the first and last point (with their
//! times), which is enough for avg/sum/min/max/last queries and, for cumulative registers, for
//! energy per bucket as the step between consecutive buckets' last values. Two aggregates of the
//! same bucket merge exactly (points arriving in several batches, or out of order), so the store
//! can fold each batch into the buckets it touches without rereading raw points.

use serde::{Deserialize, Serialize};

/// A rollup resolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Resolution {
    /// One minute.
    #[serde(rename = "1m")]
    Minute,
    /// One hour.
    #[serde(rename = "1h")]
    Hour,
    /// One day (UTC).
    #[serde(rename = "1d")]
    Day,
}

/// Every resolution, finest first.
pub const RESOLUTIONS: [Resolution; 3] = [Resolution::Minute, Resolution::Hour, Resolution::Day];

impl Resolution {
    /// The bucket length in milliseconds.
    pub fn bucket_ms(self) -> i64 {
        match self {
            Resolution::Minute => 60_000,
            Resolution::Hour => 3_600_000,
            Resolution::Day => 86_400_000,
        }
    }

    /// The name in APIs and the database (`1m`, `1h`, `1d`).
    pub fn name(self) -> &'static str {
        match self {
            Resolution::Minute => "1m",
            Resolution::Hour => "1h",
            Resolution::Day => "1d",
        }
    }

    /// Parses `1m`, `1h` or `1d`.
    pub fn parse(text: &str) -> Option<Resolution> {
        RESOLUTIONS.iter().copied().find(|r| r.name() == text)
    }

    /// The start of the bucket holding `ts`.
    pub fn bucket_of(self, ts: i64) -> i64 {
        ts.div_euclid(self.bucket_ms()) * self.bucket_ms()
    }
}

/// The aggregate of the points in one bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bucket {
    /// Bucket start (Unix ms).
    pub start: i64,
    /// Number of points.
    pub count: i64,
    /// Sum of the values (saturating).
    pub sum: i64,
    /// Smallest value.
    pub min: i64,
    /// Largest value.
    pub max: i64,
    /// Time of the earliest point.
    pub first_ts: i64,
    /// Its value.
    pub first: i64,
    /// Time of the latest point.
    pub last_ts: i64,
    /// Its value.
    pub last: i64,
}

impl Bucket {
    /// A bucket of one point.
    pub fn of(start: i64, ts: i64, value: i64) -> Bucket {
        Bucket {
            start,
            count: 1,
            sum: value,
            min: value,
            max: value,
            first_ts: ts,
            first: value,
            last_ts: ts,
            last: value,
        }
    }

    /// Merges another aggregate of the same bucket into this one.
    pub fn merge(&mut self, other: &Bucket) {
        debug_assert_eq!(self.start, other.start);
        self.count += other.count;
        self.sum = self.sum.saturating_add(other.sum);
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
        if other.first_ts < self.first_ts {
            self.first_ts = other.first_ts;
            self.first = other.first;
        }
        if other.last_ts >= self.last_ts {
            self.last_ts = other.last_ts;
            self.last = other.last;
        }
    }

    /// The mean value.
    pub fn avg(&self) -> f64 {
        self.sum as f64 / self.count.max(1) as f64
    }
}

/// Aggregates points (sorted or not) into buckets of a resolution, sorted by start.
pub fn aggregate(points: &[(i64, i64)], resolution: Resolution) -> Vec<Bucket> {
    let mut buckets: std::collections::BTreeMap<i64, Bucket> = std::collections::BTreeMap::new();
    for &(ts, value) in points {
        let start = resolution.bucket_of(ts);
        let one = Bucket::of(start, ts, value);
        buckets
            .entry(start)
            .and_modify(|b| b.merge(&one))
            .or_insert(one);
    }
    buckets.into_values().collect()
}

/// Merges new buckets into existing ones (both sorted by start), keeping the order.
pub fn merge_into(existing: &mut Vec<Bucket>, new: &[Bucket]) {
    for bucket in new {
        match existing.binary_search_by_key(&bucket.start, |b| b.start) {
            Ok(i) => existing[i].merge(bucket),
            Err(i) => existing.insert(i, *bucket),
        }
    }
}

/// Energy per bucket of a cumulative register: the step from the previous bucket's last value
/// (or from the bucket's own first value, for the first bucket) to its last value, with
/// rollovers, resets and small backward steps handled as in [`super::energy::step_energy`].
pub fn energy_per_bucket(buckets: &[Bucket], before: Option<i64>) -> Vec<(i64, i64)> {
    let mut previous = before;
    buckets
        .iter()
        .map(|b| {
            let from = previous.unwrap_or(b.first);
            let (mut energy, _) = super::energy::step_energy(from, b.first);
            if previous.is_none() {
                energy = 0;
            }
            let (inside, _) = super::energy::step_energy(b.first, b.last);
            previous = Some(b.last);
            (b.start, energy + inside)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_align_to_utc_and_aggregate() {
        assert_eq!(Resolution::Minute.bucket_of(125_000), 120_000);
        assert_eq!(Resolution::Minute.bucket_of(-1), -60_000);
        let points = [(0, 10), (30_000, 20), (61_000, 5)];
        let b = aggregate(&points, Resolution::Minute);
        assert_eq!(b.len(), 2);
        assert_eq!((b[0].count, b[0].sum, b[0].min, b[0].max), (2, 30, 10, 20));
        assert_eq!((b[0].first, b[0].last), (10, 20));
        assert!((b[0].avg() - 15.0).abs() < 1e-9);
        assert_eq!(b[1].start, 60_000);
    }

    #[test]
    fn merging_in_pieces_equals_aggregating_at_once() {
        let points: Vec<(i64, i64)> = (0..500).map(|i| (i * 997, (i * 37) % 101)).collect();
        let whole = aggregate(&points, Resolution::Minute);
        let mut pieces = Vec::new();
        // Out of order, in uneven chunks.
        for chunk in points.rchunks(37) {
            merge_into(&mut pieces, &aggregate(chunk, Resolution::Minute));
        }
        assert_eq!(pieces, whole);
    }

    #[test]
    fn energy_per_bucket_counts_steps_across_buckets() {
        let points = [(0, 100), (50_000, 110), (70_000, 115), (130_000, 130)];
        let b = aggregate(&points, Resolution::Minute);
        let e = energy_per_bucket(&b, None);
        assert_eq!(e, vec![(0, 10), (60_000, 5), (120_000, 15)]);
        let total: i64 = e.iter().map(|(_, v)| v).sum();
        assert_eq!(total, 30);
        assert_eq!(energy_per_bucket(&b, Some(90))[0], (0, 20));
    }

    #[test]
    fn resolutions_parse() {
        for r in RESOLUTIONS {
            assert_eq!(Resolution::parse(r.name()), Some(r));
        }
        assert_eq!(Resolution::parse("5m"), None);
    }
}
