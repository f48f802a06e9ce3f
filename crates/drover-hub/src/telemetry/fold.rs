//! What the writer lands and the folder folds into the store: checked batches, grouped by
//! series, and what comes out (landed or duplicate, stored points, the points for the live
//! stream).

use drover_protocol::ids::DeviceId;
use drover_protocol::reading::{Channel, MeterId, Reading};
use serde::Serialize;

/// One stored point: time, scaled value, clock state code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Point {
    /// Unix ms.
    pub ts: i64,
    /// Scaled value.
    pub value: i64,
    /// [`drover_protocol::reading::ClockState`] code.
    pub clock: u8,
}

/// The points of one series in one batch, sorted by time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeriesPoints {
    /// The meter.
    pub meter: MeterId,
    /// The channel.
    pub channel: Channel,
    /// The decimal exponent of the values.
    pub scale: i8,
    /// The points.
    pub points: Vec<Point>,
}

/// A checked batch, ready to store.
#[derive(Debug, Clone)]
pub struct IngestJob {
    /// The device's organization.
    pub org_id: i64,
    /// The device.
    pub device: DeviceId,
    /// The batch's sequence number (stored once per device and number); `None` for the seed's
    /// JSON formats, which have none and are deduplicated point by point (series and time).
    pub seq: Option<u64>,
    /// Its points, per series.
    pub series: Vec<SeriesPoints>,
    /// Its size on the wire, for the device's data-use account.
    pub bytes: u64,
    /// The plain batch frame it came as, when it came as one (`POST /device/v1/batches`): it
    /// lands as it is, instead of being encoded again. `None` for stream frames and the seed's
    /// JSON, which land as frames encoded from `series`.
    pub frame: Option<Vec<u8>>,
}

/// The writer's answer to a submitted batch, once it is durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "outcome")]
pub enum IngestOutcome {
    /// Landed durably (acknowledged); the folder writes it into chunks and rollups soon after.
    Landed {
        /// Readings in the batch.
        points: u64,
    },
    /// A batch with this sequence number (or a higher one) was stored before; nothing was done.
    Duplicate {
        /// The device's highest stored sequence number (0 when the device is not found), so
        /// that a device whose counter went back (its state restored from an old copy) can
        /// jump past it instead of having every new batch taken for a resend.
        last_seq: u64,
    },
}

/// What folding did with a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "outcome")]
pub enum FoldOutcome {
    /// Stored now.
    Stored {
        /// Points stored (points already stored for the same series and time are skipped).
        points: u64,
        /// Backward steps of cumulative registers that were flagged.
        flags: u64,
    },
    /// A batch with this sequence number (or a higher one) was stored before; nothing was done.
    Duplicate {
        /// The device's highest stored sequence number (0 when the device is not found), so
        /// that a device whose counter went back (its state restored from an old copy) can
        /// jump past it instead of having every new batch taken for a resend.
        last_seq: u64,
    },
}

/// A point just stored, for live charts.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LivePoint {
    /// The organization (the stream filters on it).
    #[serde(skip)]
    pub org_id: i64,
    /// The series.
    pub series: i64,
    /// The device.
    pub device: String,
    /// The meter.
    pub meter: String,
    /// The channel.
    pub channel: Channel,
    /// Unix ms.
    pub ts: i64,
    /// The value in the channel's unit.
    pub value: f64,
}

/// Groups readings (in the batch's canonical order: meter, channel, scale, time) into series.
pub fn group_by_series(readings: Vec<Reading>) -> Vec<SeriesPoints> {
    let mut series: Vec<SeriesPoints> = Vec::new();
    for r in readings {
        let point = Point {
            ts: r.ts_ms,
            value: r.value,
            clock: r.clock as u8,
        };
        match series.last_mut() {
            Some(s) if s.meter == r.meter && s.channel == r.channel && s.scale == r.scale => {
                s.points.push(point);
            }
            _ => series.push(SeriesPoints {
                meter: r.meter,
                channel: r.channel,
                scale: r.scale,
                points: vec![point],
            }),
        }
    }
    for s in &mut series {
        s.points.sort_by_key(|p| p.ts);
    }
    series
}
