//! Opening a spool after whatever a crash or power cut left: every segment is scanned and cut
//! back to its good records, readings lost to damage are counted (once), and the segment to
//! append to is chosen or started. See the [`super`] documentation for the rules.

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use drover_protocol::spool::SEGMENT_HEADER;

use super::SpoolError;
use super::segment::{self, Segment};
use super::state::State;
use crate::fsutil::{self, Context as _};

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
            if scan.valid_len == 0 {
                if !is_last {
                    fsutil::remove_if_exists(&path)?;
                    continue;
                }
                let (_, path) = segment::create(dir, first_id)?;
                segments.push(empty(first_id, path));
                continue;
            }
            segment::truncate(&path, scan.valid_len)?;
        }
        segments.push(Segment {
            first_id,
            path,
            bytes: scan.valid_len,
            last_id: scan.last_id,
            first_reading: scan.first_reading.unwrap_or(0),
            end_reading: scan.end_reading.unwrap_or(0),
        });
    }
    Ok(segments)
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
