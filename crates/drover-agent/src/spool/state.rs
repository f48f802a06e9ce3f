//! The spool's small persisted state, `state.json`: where the acknowledged cursor stands and
//! how many readings were dropped. Written with [`fsutil::write_json_atomic`], so a crash
//! leaves the old or the new version; written before the segment files it makes obsolete are
//! deleted, so a crash in between leaves files that the next open deletes again.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::fsutil::{self, FileError};

/// The file name inside the spool directory.
pub(super) const FILE: &str = "state.json";

/// What must survive a restart besides the records themselves.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct State {
    /// Every record up to this ID is done with: acknowledged by the hub, or dropped (0: none).
    /// The next record ID is always above it, even when every segment has been deleted.
    pub acked_through: u64,
    /// The number of the first reading after record `acked_through`.
    pub acked_readings: u64,
    /// Readings dropped over the spool's life: from a full spool, from damaged segments, from
    /// failed writes.
    pub dropped_total: u64,
    /// Readings lost to damage have been counted into `dropped_total` up to this reading
    /// number, so that reopening the same damaged spool does not count them again.
    pub damage_counted_to: u64,
}

impl State {
    /// Reads the state; `Ok(None)` when there is none yet.
    pub fn load(dir: &Path) -> Result<Option<State>, FileError> {
        fsutil::read_json(&dir.join(FILE))
    }

    /// Writes the state atomically and durably.
    pub fn save(&self, dir: &Path) -> Result<(), FileError> {
        fsutil::write_json_atomic(&dir.join(FILE), self, fsutil::PUBLIC)
    }
}
