//! Telemetry batches: the compact binary frame a device sends the hub with its readings
//! (`POST /device/v1/batches`, body = one frame, `Content-Type: application/x-drover-batch`).
//!
//! A frame is a version byte, a bit-packed body and a CRC-32 of everything before it. The body
//! names the device and the batch's sequence number, then each meter with its timestamp columns
//! (shared by the meter's series whenever they were read in the same polls, with each row's
//! [`ClockState`] as runs) and one value column per series and scale; a series that missed some
//! polls marks them as absent rows. Each column is delta-, delta-of-delta- or grid-predicted and
//! its residuals bit-packed or Rice-coded, whichever is shortest (see `column.rs`). The byte-by-
//! byte layout, with a worked example, is in docs/protocol.md, "Telemetry batches".
//!
//! A 2-second, 3-channel meter costs about 1.2 bytes per reading in one-minute batches, 0.74 in
//! five-minute ones and 0.66 in hour-long ones (the test
//! `payload_bytes_per_point_stay_under_the_measured_budget` prints the figures).
//!
//! ```
//! use drover_protocol::batch::{self, Batch};
//! use drover_protocol::ids::DeviceId;
//! use drover_protocol::reading::{Channel, ClockState, MeterId, Reading};
//!
//! let meter = MeterId::parse("modbus-12345678")?;
//! let reading = |channel, ts_ms, value| Reading {
//!     meter: meter.clone(), channel, ts_ms, value, scale: -1, clock: ClockState::Synced,
//! };
//! let sent = Batch {
//!     device: DeviceId::parse("k3x9m2p7qa")?,
//!     seq: 42,
//!     readings: vec![
//!         reading(Channel::Power, 1_780_000_002_001, 23_456),
//!         reading(Channel::Power, 1_780_000_000_000, 23_411),
//!     ],
//! };
//! let frame = batch::encode(&sent)?;
//! let received = batch::decode(&frame)?;
//! assert_eq!(received.seq, 42);
//! // Readings come back in the canonical order (meter, channel, scale, time, ...).
//! assert_eq!(received.readings[0].ts_ms, 1_780_000_000_000);
//! assert_eq!(received, sent.canonical());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub(crate) mod bits;
pub(crate) mod column;
mod frame;
pub mod stream;
#[cfg(test)]
mod stream_tests;
pub mod synthetic;
#[cfg(test)]
mod tests;

use std::cmp::Ordering;

use crate::ids::DeviceId;
use crate::reading::{BadMeterId, ClockState, Reading};

/// The format version in the first byte of every frame. A decoder refuses other versions with
/// [`BatchError::UnsupportedVersion`]; every version ends with a CRC-32 of the bytes before it.
pub const FORMAT_VERSION: u8 = 1;

/// The format version of a stream frame: a frame written against the frames before it on the
/// same telemetry stream ([`stream::StreamContext`]), valid only there.
pub const STREAM_FORMAT_VERSION: u8 = 2;

/// The `Content-Type` of a request whose body is one frame.
pub const CONTENT_TYPE: &str = "application/x-drover-batch";

/// The most readings one batch may carry. A 2-second meter with three channels produces 5,400
/// an hour; senders split larger backlogs into several batches.
pub const MAX_READINGS: usize = 65_536;

/// The most meters one batch may carry.
pub const MAX_METERS: usize = 256;

/// The most series (meter, channel and scale) one batch may carry, over all its meters.
pub const MAX_SERIES: usize = 1024;

/// The longest meter ID, in bytes (see [`MeterId`](crate::reading::MeterId)).
pub const MAX_METER_ID_BYTES: usize = 64;

/// The largest frame. No batch within the other limits encodes to more (a reading costs at
/// most 16 bytes), so a hub may refuse longer bodies before reading them.
pub const MAX_BATCH_BYTES: usize = 4 * 1024 * 1024;

/// One batch of readings from one device.
///
/// The order of `readings` does not travel: [`decode`] returns them in the canonical order of
/// [`canonical_order`], and [`encode`] gives the same bytes for any order of the same readings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// The device that took the readings; the hub checks it against the request's credential.
    pub device: DeviceId,
    /// The device's sequence number for this batch: increasing, never reused, so that the hub
    /// can drop a batch it has already stored.
    pub seq: u64,
    /// The readings, of any meters and channels, at most [`MAX_READINGS`].
    pub readings: Vec<Reading>,
}

impl Batch {
    /// The same batch with its readings in canonical order: what `decode(encode(self))` gives.
    pub fn canonical(&self) -> Batch {
        let mut readings = self.readings.clone();
        readings.sort_by(canonical_order);
        Batch {
            device: self.device.clone(),
            seq: self.seq,
            readings,
        }
    }
}

/// The canonical order of readings in a decoded batch: by meter, channel, scale, timestamp,
/// clock state (synced, unsynced, unknown) and value.
pub fn canonical_order(a: &Reading, b: &Reading) -> Ordering {
    a.meter
        .cmp(&b.meter)
        .then(a.channel.cmp(&b.channel))
        .then(a.scale.cmp(&b.scale))
        .then(a.ts_ms.cmp(&b.ts_ms))
        .then(clock_code(a.clock).cmp(&clock_code(b.clock)))
        .then(a.value.cmp(&b.value))
}

/// Encodes a batch into one frame. The same readings give the same bytes, whatever their order.
///
/// Fails only with [`BatchError::TooLarge`] when the batch is past one of the limits
/// ([`MAX_READINGS`], [`MAX_METERS`], [`MAX_SERIES`]).
pub fn encode(batch: &Batch) -> Result<Vec<u8>, BatchError> {
    frame::encode(batch, bits::Effort::Smallest)
}

/// Encodes a batch into one frame like [`encode`], but codes every column with one fixed
/// predictor and coder instead of searching for the smallest: several times faster, somewhat
/// larger, decoded by [`decode`] like any frame. For frames kept briefly, where the encoder's
/// time counts more than the bytes (the hub's landing table).
pub fn encode_quick(batch: &Batch) -> Result<Vec<u8>, BatchError> {
    frame::encode(batch, bits::Effort::Quick)
}

/// Decodes one frame: checks the checksum first, then the version, then every field against
/// the limits before allocating for it. Readings come back in [`canonical_order`].
pub fn decode(frame: &[u8]) -> Result<Batch, BatchError> {
    frame::decode(frame)
}

/// Why a frame could not be decoded (or a batch encoded). The messages are written for the
/// device's operator and fit in a 4xx body; [`BatchError::code`] is the stable code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    /// The frame ends in the middle of a field.
    #[error(
        "the batch is truncated: it ends at byte {offset} in the middle of a field; send the whole frame"
    )]
    Truncated {
        /// Where the data ended (the checksum's offset, or the frame's length).
        offset: usize,
    },
    /// The CRC-32 at the end of the frame does not match the bytes before it.
    #[error(
        "the batch's checksum does not match (frame says {expected:08x}, content gives {actual:08x}): it was damaged or cut short on the way; send it again"
    )]
    BadChecksum {
        /// The CRC-32 the frame carries.
        expected: u32,
        /// The CRC-32 of the bytes before it.
        actual: u32,
    },
    /// The frame's version byte is not [`FORMAT_VERSION`].
    #[error(
        "batch format version {0} is not supported (this side speaks version {FORMAT_VERSION}); update the hub or downgrade the agent"
    )]
    UnsupportedVersion(u8),
    /// The device ID holds a character outside `a`–`z`, `0`–`9`, `-` and `_`.
    #[error("the batch's device ID is not valid: device IDs are 1 to 64 of a-z, 0-9, '-' and '_'")]
    BadDeviceId,
    /// A meter ID breaks the rules of [`MeterId`](crate::reading::MeterId).
    #[error("a meter ID in the batch is not valid: {0}")]
    BadMeterId(#[from] BadMeterId),
    /// A series has a channel code this side does not know (the device may be newer).
    #[error(
        "unknown channel code {0} in the batch (this side knows 1 to {known}); the device may be newer than the hub",
        known = crate::reading::CHANNELS.len()
    )]
    UnknownChannel(u8),
    /// A clock-state code is not 0 (synced), 1 (unsynced) or 2 (unknown).
    #[error("unknown clock state code {0} in the batch (known: 0 synced, 1 unsynced, 2 unknown)")]
    UnknownClockState(u8),
    /// A count is past one of the limits (readings, meters, series, bytes).
    #[error("the batch has more {what} than the limit of {limit}; send smaller batches")]
    TooLarge {
        /// What was counted: "readings", "meters", "series" or "bytes".
        what: &'static str,
        /// The limit.
        limit: usize,
    },
    /// Whole bytes are left between the last series and the checksum.
    #[error("{count} unexpected bytes after the last series of the batch")]
    TrailingBytes {
        /// How many.
        count: usize,
    },
    /// A field holds a value the format does not allow (the message says which).
    #[error("the batch is malformed: {0}")]
    Invalid(&'static str),
}

impl BatchError {
    /// A stable, machine-readable code for the error, for the `error` field of a hub's 4xx body.
    pub fn code(&self) -> &'static str {
        match self {
            BatchError::Truncated { .. } => "batch_truncated",
            BatchError::BadChecksum { .. } => "batch_checksum",
            BatchError::UnsupportedVersion(_) => "batch_version",
            BatchError::BadDeviceId => "batch_device_id",
            BatchError::BadMeterId(_) => "batch_meter_id",
            BatchError::UnknownChannel(_) => "batch_channel",
            BatchError::UnknownClockState(_) => "batch_clock_state",
            BatchError::TooLarge { .. } => "batch_too_large",
            BatchError::TrailingBytes { .. } => "batch_trailing_bytes",
            BatchError::Invalid(_) => "batch_invalid",
        }
    }
}

/// A clock state's wire code (2 bits).
fn clock_code(clock: ClockState) -> u8 {
    clock as u8
}
