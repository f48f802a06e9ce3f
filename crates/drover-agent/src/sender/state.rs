//! The sender's persisted state, `telemetry.json`: the next batch sequence number, the batch in
//! flight, and the month's byte count. Written atomically (and fsync'd) before a batch is first
//! sent and after the hub acknowledged it, so that a batch keeps its sequence number across
//! crashes and retries, and a sequence number is never given to two different batches.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::fsutil::{self, FileError};

/// A batch that was given a sequence number and may have reached the hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inflight {
    /// Its sequence number.
    pub seq: u64,
    /// The spool record it starts with.
    pub first_id: u64,
    /// The spool record it ends with.
    pub last_id: u64,
    /// How many readings it held when it was made.
    pub readings: u64,
}

/// What must survive a restart.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SenderState {
    /// The sequence number the next new batch gets (starts at 1; never reused).
    pub next_seq: u64,
    /// The oldest batch sent but not yet acknowledged, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inflight: Option<Inflight>,
    /// The batches sent after `inflight` on the telemetry stream and not yet acknowledged, in
    /// order: increasing sequence numbers over consecutive spool records. Empty unless
    /// `inflight` is set.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub later: Vec<Inflight>,
    /// The calendar month (UTC) `month_bytes` counts, as `year * 12 + month - 1`.
    #[serde(default)]
    pub month: i64,
    /// Bytes sent for telemetry in `month`, as the agent estimates them.
    #[serde(default)]
    pub month_bytes: u64,
    /// Readings the hub refused for good (a frame it cannot take, timestamps it finds
    /// implausible), over the device's life. Counted and reported, never silent.
    #[serde(default)]
    pub refused_readings: u64,
}

impl SenderState {
    /// The batches not yet acknowledged, oldest first.
    pub fn window(&self) -> impl Iterator<Item = &Inflight> {
        self.inflight.iter().chain(self.later.iter())
    }

    /// How many batches are not yet acknowledged.
    pub fn window_len(&self) -> usize {
        self.inflight.map_or(0, |_| 1 + self.later.len())
    }

    /// Adds a new batch at the end of the window.
    pub fn push(&mut self, batch: Inflight) {
        if self.inflight.is_none() {
            self.inflight = Some(batch);
        } else {
            self.later.push(batch);
        }
    }

    /// Removes the oldest batch of the window (acknowledged or dropped).
    pub fn pop(&mut self) {
        self.inflight = if self.later.is_empty() {
            None
        } else {
            Some(self.later.remove(0))
        };
    }

    /// Reads the state; a fresh one when there is none.
    pub fn load(path: &Path) -> Result<SenderState, FileError> {
        let mut state: SenderState = fsutil::read_json(path)?.unwrap_or_default();
        state.next_seq = state.next_seq.max(1);
        Ok(state)
    }

    /// Writes the state atomically and durably.
    pub fn save(&self, path: &Path) -> Result<(), FileError> {
        fsutil::write_json_atomic(path, self, fsutil::PUBLIC)
    }

    /// Adds `bytes` to the count of `month`, starting the count over in a later month. A month
    /// earlier than the one counted (a clock that has not been set yet: a Raspberry Pi without
    /// a real-time clock boots in the past) counts into the current count instead of resetting
    /// it.
    pub fn count_bytes(&mut self, month: i64, bytes: u64) {
        if month > self.month {
            self.month = month;
            self.month_bytes = 0;
        }
        self.month_bytes = self.month_bytes.saturating_add(bytes);
    }

    /// The bytes counted for `month` (0 when the count is of another month).
    pub fn bytes_in(&self, month: i64) -> u64 {
        if month == self.month {
            self.month_bytes
        } else {
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn survives_a_round_trip_and_starts_sequence_numbers_at_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("telemetry.json");
        let fresh = SenderState::load(&path).unwrap();
        assert_eq!(fresh.next_seq, 1);
        let mut state = fresh;
        state.next_seq = 9;
        state.inflight = Some(Inflight {
            seq: 7,
            first_id: 3,
            last_id: 9,
            readings: 21,
        });
        state.later.push(Inflight {
            seq: 8,
            first_id: 10,
            last_id: 12,
            readings: 9,
        });
        state.count_bytes(24_310, 500);
        state.save(&path).unwrap();
        assert_eq!(SenderState::load(&path).unwrap(), state);
    }

    #[test]
    fn the_byte_count_starts_over_each_month() {
        let mut state = SenderState::default();
        state.count_bytes(100, 10);
        state.count_bytes(100, 5);
        assert_eq!(state.bytes_in(100), 15);
        assert_eq!(state.bytes_in(101), 0);
        state.count_bytes(101, 7);
        assert_eq!(state.bytes_in(101), 7);
        // A clock set back (not yet synchronised) does not reset the count.
        state.count_bytes(1, 3);
        assert_eq!(state.bytes_in(101), 10);
    }
}
