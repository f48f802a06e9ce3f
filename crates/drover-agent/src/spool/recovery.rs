//! Opening a spool after whatever a crash or power cut left: every segment is scanned and cut
//! back to its good records, readings lost to damage are counted (once), and the segment to
//! append to is chosen or started. Damage that appears while the spool is open is given up by
//! the same rule ([`Spool::give_up_damage`]). See the [`super`] documentation for the rules.

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use drover_protocol::spool::SEGMENT_HEADER;

use super::segment::{self, Scan, Segment};
use super::state::State;
use super::{Spool, SpoolError};
use crate::fsutil::{self, Context as _, FileError};

/// Scans every segment file and cuts each back to its good records (see the module
/// documentation). Returns one entry per segment that is left, with its good records; a
/// segment without a readable header is removed, unless it is the last, which is rewritten as
/// empty.
pub(super) fn recover(dir: &Path) -> Result<Vec<Segment>, SpoolError> {
    let files = segment::list(dir)?;
    let count = files.len();
    let mut segments = Vec::with_capacity(count);
    for (i, (first_id, path)) in files.into_iter().enumerate() {
        let is_last = i + 1 == count;
        let bytes = fs::read(&path).at("reading", &path)?;
        let scan = segment::scan(&bytes, first_id);
        let file_len = bytes.len() as u64;
        drop(bytes);
        if let Some((offset, error)) = &scan.damage {
            let discarded = file_len - scan.valid_len;
            if is_last {
                tracing::warn!(path = %path.display(), offset, discarded, %error,
                    "spool: cutting a torn tail (expected after a power cut)");
            } else {
                tracing::warn!(path = %path.display(), offset, discarded, %error,
                    "spool: damaged segment; the rest of it is lost");
            }
            if scan.valid_len == 0 && is_last {
                let (_, path) = segment::create(dir, first_id)?;
                segments.push(empty(first_id, path));
                continue;
            }
            cut(&path, &scan)?;
        }
        segments.extend(kept(first_id, path, &scan));
    }
    Ok(segments)
}

/// What is left of a segment once the damage `scan` found is given up: its good records, or
/// nothing when not even its header is good.
fn kept(first_id: u64, path: PathBuf, scan: &Scan) -> Option<Segment> {
    if scan.valid_len == 0 {
        return None;
    }
    Some(Segment {
        first_id,
        path,
        bytes: scan.valid_len,
        last_id: scan.last_id,
        first_reading: scan.first_reading.unwrap_or(0),
        end_reading: scan.end_reading.unwrap_or(0),
    })
}

/// Cuts a damaged segment file back to what [`kept`] keeps: after its last good record, or
/// away altogether when not even its header is good.
fn cut(path: &Path, scan: &Scan) -> Result<(), FileError> {
    if scan.valid_len == 0 {
        fsutil::remove_if_exists(path)
    } else {
        segment::truncate(path, scan.valid_len)
    }
}

fn empty(first_id: u64, path: PathBuf) -> Segment {
    Segment {
        first_id,
        path,
        bytes: SEGMENT_HEADER.len() as u64,
        last_id: None,
        first_reading: 0,
        end_reading: 0,
    }
}

/// Readings lost between segments (the records after damage), not yet counted and not
/// acknowledged: the gaps in the reading numbers. Marks them counted in `state`.
pub(super) fn count_damage(segments: &[Segment], state: &mut State) -> u64 {
    let mut lost = 0;
    let mut expected = state.acked_readings;
    for segment in segments.iter().filter(|s| s.last_id.is_some()) {
        if segment.first_reading > expected {
            let from = expected.max(state.damage_counted_to);
            lost += segment.first_reading.saturating_sub(from);
            state.damage_counted_to = state.damage_counted_to.max(segment.first_reading);
        }
        expected = expected.max(segment.end_reading);
    }
    lost
}

/// After recovery: deletes the segments the cursor has passed (and an empty last segment
/// whose name is not the next ID), and opens the segment to append to, which must continue
/// the IDs and reading numbers of its last record; if it cannot, a new one is started.
pub(super) fn settle(
    dir: &Path,
    mut segments: Vec<Segment>,
    state: &State,
    next_id: u64,
    next_reading: u64,
) -> Result<(Vec<Segment>, File), SpoolError> {
    let mut obsolete = Vec::new();
    let mut last = segments.pop();
    if let Some(segment) = last.take_if(|s| {
        (s.last_id.is_none() && s.first_id != next_id)
            || s.last_id.is_some_and(|id| id + 1 != next_id)
            || (s.last_id.is_some() && s.end_reading != next_reading)
    }) {
        // Cannot be appended to; it stays only if it holds unacknowledged records.
        segments.push(segment);
    }
    let (kept, passed): (Vec<Segment>, Vec<Segment>) = segments
        .into_iter()
        .partition(|s| s.last_id.is_some_and(|id| id > state.acked_through));
    obsolete.extend(passed);
    let mut segments = kept;
    for segment in &obsolete {
        fsutil::remove_if_exists(&segment.path)?;
    }
    if !obsolete.is_empty() {
        fsutil::sync_dir(dir)?;
    }
    let file = match last {
        Some(mut segment) => {
            let file = segment::open_append(&segment.path)?;
            // A killed process leaves its last records in the page cache only.
            file.sync_data().at("syncing", &segment.path)?;
            if segment.last_id.is_none() {
                segment.first_reading = next_reading;
                segment.end_reading = next_reading;
            }
            segments.push(segment);
            file
        }
        None => {
            let (file, path) = segment::create(dir, next_id)?;
            let mut segment = empty(next_id, path);
            segment.first_reading = next_reading;
            segment.end_reading = next_reading;
            segments.push(segment);
            file
        }
    };
    Ok((segments, file))
}

impl Spool {
    /// Gives up the damage in the segment at `path` that a read found while the spool was open
    /// (a failing SD card), by the rule [`recover`] applies to a segment that is not the last:
    /// the segment keeps the good run [`segment::scan`] finds and loses the rest, and the lost
    /// readings that were not acknowledged are counted as dropped, persisted and logged, once.
    /// Returns `false` when there is no such segment or no damage in it, so the caller's error
    /// stands.
    ///
    /// The readings are counted here, by their numbers, rather than by [`count_damage`] at the
    /// next open; `damage_counted_to` moves past them so that the gap they leave is not
    /// counted again then.
    pub(super) fn give_up_damage(&mut self, path: &Path) -> Result<bool, SpoolError> {
        let Some(index) = self.segments.iter().position(|s| s.path == path) else {
            return Ok(false);
        };
        let damaged = self.segments[index].clone();
        let bytes = fs::read(&damaged.path).at("reading", &damaged.path)?;
        // Bytes past the good records of the active segment are a failed write's leftovers,
        // which the spool never reads.
        let bytes = bytes.get(..damaged.bytes as usize).unwrap_or(&bytes);
        let scan = segment::scan(bytes, damaged.first_id);
        let Some((offset, error)) = &scan.damage else {
            return Ok(false);
        };
        if index + 1 == self.segments.len() {
            // Records appended after the damage would be cut with it at the next open, and a
            // segment's records must follow each other: close this one and go on in a new
            // segment. Started before anything is cut, and named by the next ID, it keeps the
            // IDs handed out taken across a reopen (see `Spool::open`).
            self.roll()?;
        }
        // Closing the segment may have deleted it, if everything in it was acknowledged.
        let Some(index) = self.segments.iter().position(|s| s.path == path) else {
            return Ok(true);
        };
        match kept(damaged.first_id, damaged.path.clone(), &scan) {
            Some(segment) => {
                self.total_bytes -= damaged.bytes - segment.bytes;
                self.segments[index] = segment;
            }
            None => {
                self.total_bytes -= damaged.bytes;
                self.segments.remove(index);
            }
        }

        let lost_from = scan.end_reading.unwrap_or(damaged.first_reading);
        let lost = damaged
            .end_reading
            .saturating_sub(lost_from.max(self.state.acked_readings));
        self.state.dropped_total += lost;
        self.state.damage_counted_to = self.state.damage_counted_to.max(damaged.end_reading);
        tracing::warn!(
            path = %damaged.path.display(),
            offset,
            %error,
            lost,
            dropped_total = self.state.dropped_total,
            "spool: a segment was damaged while open; the rest of it is lost and counted as dropped"
        );
        // The count is persisted before the file is cut: a crash in between leaves damage that
        // the next open cuts without counting it again.
        self.state.save(&self.dir)?;
        cut(&damaged.path, &scan)?;
        Ok(true)
    }
}
