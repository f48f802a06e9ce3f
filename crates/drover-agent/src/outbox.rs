//! The outbox: update reports kept on disk until the hub acknowledges them.
//!
//! One file per report, named by its sequence number padded to 20 digits so that a directory
//! listing sorts in order. The next sequence number is kept in `next-seq` and written *before*
//! the report that uses it, so a crash between the two leaves a gap (allowed: numbers only have
//! to increase) but never a reuse, even after every report was delivered and deleted. The hub
//! ignores reports it has seen, so sending one twice after a crash is harmless.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use drover_protocol::MAX_MESSAGE_BYTES;
use drover_protocol::device::{ReportState, UpdateReport, truncate_output};

use crate::fsutil::{self, Context as _, FileError};

const COUNTER_FILE: &str = "next-seq";

/// A report before it has a sequence number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportDraft {
    /// The release version.
    pub release: String,
    /// Which attempt at the release.
    pub attempt: u32,
    /// The step.
    pub state: ReportState,
    /// A one-line description.
    pub message: Option<String>,
    /// Captured output (truncated on push).
    pub output: Option<String>,
}

/// The on-disk queue of reports.
#[derive(Debug)]
pub struct Outbox {
    dir: PathBuf,
    next_seq: u64,
}

impl Outbox {
    /// Opens (creating if needed) the outbox in `dir`.
    pub fn open(dir: &Path) -> Result<Outbox, FileError> {
        fsutil::create_dir_all(dir, 0o700)?;
        let counter = fsutil::read_text(&dir.join(COUNTER_FILE))?
            .and_then(|text| text.trim().parse::<u64>().ok())
            .unwrap_or(1);
        // The counter is written first, so it is normally ahead of every file; taking the max
        // also covers a counter file lost or damaged by hand.
        let after_files = list(dir)?.last().map_or(1, |(seq, _)| seq + 1);
        Ok(Outbox {
            dir: dir.to_path_buf(),
            next_seq: counter.max(after_files).max(1),
        })
    }

    /// Stores a report and returns the sequence number it was given.
    pub fn push(&mut self, draft: ReportDraft) -> Result<u64, FileError> {
        let seq = self.next_seq;
        fsutil::write_atomic(
            &self.dir.join(COUNTER_FILE),
            format!("{}\n", seq + 1).as_bytes(),
            fsutil::PUBLIC,
        )?;
        self.next_seq = seq + 1;
        let report = UpdateReport {
            seq,
            at_ms: now_ms(),
            release: draft.release,
            attempt: draft.attempt,
            state: draft.state,
            message: draft
                .message
                .map(|m| truncate_output(&m, MAX_MESSAGE_BYTES)),
            output: draft
                .output
                .map(|o| truncate_output(&o, drover_protocol::MAX_OUTPUT_BYTES)),
        };
        fsutil::write_json_atomic(&file_for(&self.dir, seq), &report, fsutil::PUBLIC)?;
        Ok(seq)
    }

    /// Up to `limit` reports, oldest first. A file that cannot be parsed (damaged by hand or by
    /// the disk) is removed with a warning, so that it cannot block every later report.
    pub fn pending(&self, limit: usize) -> Result<Vec<UpdateReport>, FileError> {
        let mut out = Vec::new();
        for (seq, path) in list(&self.dir)? {
            if out.len() >= limit {
                break;
            }
            match fsutil::read_json::<UpdateReport>(&path) {
                Ok(Some(report)) if report.seq == seq => out.push(report),
                Ok(None) => {}
                Ok(Some(_)) | Err(_) => {
                    tracing::warn!(path = %path.display(), "dropping a damaged outbox entry");
                    fsutil::remove_if_exists(&path)?;
                }
            }
        }
        Ok(out)
    }

    /// How many reports wait.
    pub fn len(&self) -> Result<usize, FileError> {
        Ok(list(&self.dir)?.len())
    }

    /// Whether no report waits.
    pub fn is_empty(&self) -> Result<bool, FileError> {
        Ok(self.len()? == 0)
    }

    /// Deletes every report with `seq <= through` (they are delivered, or deliberately dropped).
    pub fn remove_through(&mut self, through: u64) -> Result<usize, FileError> {
        let mut removed = 0;
        for (seq, path) in list(&self.dir)? {
            if seq > through {
                break;
            }
            fs::remove_file(&path).at("removing", &path)?;
            removed += 1;
        }
        if removed > 0 {
            fsutil::sync_dir(&self.dir)?;
        }
        Ok(removed)
    }
}

/// Counts the reports waiting in an outbox directory without opening it for writing.
pub fn count(dir: &Path) -> Result<usize, FileError> {
    if !dir.exists() {
        return Ok(0);
    }
    Ok(list(dir)?.len())
}

fn file_for(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:020}.json"))
}

/// The report files in `dir`, sorted by sequence number.
fn list(dir: &Path) -> Result<Vec<(u64, PathBuf)>, FileError> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).at("listing", dir)? {
        let entry = entry.at("listing", dir)?;
        let name = entry.file_name();
        let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(".json")) else {
            continue;
        };
        if stem.len() == 20
            && let Ok(seq) = stem.parse::<u64>()
        {
            out.push((seq, entry.path()));
        }
    }
    out.sort_unstable_by_key(|(seq, _)| *seq);
    Ok(out)
}

/// Milliseconds since the Unix epoch on this device's clock.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn draft(release: &str, state: ReportState) -> ReportDraft {
        ReportDraft {
            release: release.into(),
            attempt: 1,
            state,
            message: None,
            output: None,
        }
    }

    #[test]
    fn reports_come_back_in_order_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let mut outbox = Outbox::open(dir.path()).unwrap();
        for state in [
            ReportState::Downloading,
            ReportState::Installing,
            ReportState::Success,
        ] {
            outbox.push(draft("1.0", state)).unwrap();
        }
        drop(outbox);
        let outbox = Outbox::open(dir.path()).unwrap();
        let pending = outbox.pending(10).unwrap();
        let seqs: Vec<u64> = pending.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, vec![1, 2, 3]);
        assert_eq!(pending[2].state, ReportState::Success);
        assert_eq!(outbox.pending(2).unwrap().len(), 2);
    }

    #[test]
    fn sequence_numbers_are_never_reused_after_delivery() {
        let dir = tempfile::tempdir().unwrap();
        let mut outbox = Outbox::open(dir.path()).unwrap();
        outbox.push(draft("1.0", ReportState::Success)).unwrap();
        outbox.push(draft("1.0", ReportState::Success)).unwrap();
        assert_eq!(outbox.remove_through(2).unwrap(), 2);
        assert!(outbox.is_empty().unwrap());
        drop(outbox);
        let mut outbox = Outbox::open(dir.path()).unwrap();
        assert_eq!(outbox.push(draft("2.0", ReportState::Failure)).unwrap(), 3);
    }

    #[test]
    fn partial_acks_keep_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let mut outbox = Outbox::open(dir.path()).unwrap();
        for _ in 0..5 {
            outbox.push(draft("1.0", ReportState::Downloading)).unwrap();
        }
        outbox.remove_through(3).unwrap();
        let seqs: Vec<u64> = outbox.pending(10).unwrap().iter().map(|r| r.seq).collect();
        assert_eq!(seqs, vec![4, 5]);
        assert_eq!(count(dir.path()).unwrap(), 2);
    }

    #[test]
    fn a_lost_counter_file_does_not_reuse_numbers_still_queued() {
        let dir = tempfile::tempdir().unwrap();
        let mut outbox = Outbox::open(dir.path()).unwrap();
        for _ in 0..3 {
            outbox.push(draft("1.0", ReportState::Downloading)).unwrap();
        }
        fs::remove_file(dir.path().join(COUNTER_FILE)).unwrap();
        let mut outbox = Outbox::open(dir.path()).unwrap();
        assert_eq!(outbox.push(draft("1.0", ReportState::Success)).unwrap(), 4);
    }

    #[test]
    fn long_output_is_truncated_and_damaged_entries_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let mut outbox = Outbox::open(dir.path()).unwrap();
        let mut big = draft("1.0", ReportState::Failure);
        big.output = Some("x".repeat(drover_protocol::MAX_OUTPUT_BYTES * 2));
        big.message = Some("m".repeat(MAX_MESSAGE_BYTES + 1));
        outbox.push(big).unwrap();
        fs::write(file_for(dir.path(), 7), b"{torn").unwrap();
        let pending = outbox.pending(10).unwrap();
        assert_eq!(pending.len(), 1);
        assert!(pending[0].output.as_ref().unwrap().len() <= drover_protocol::MAX_OUTPUT_BYTES);
        assert!(pending[0].message.as_ref().unwrap().len() <= MAX_MESSAGE_BYTES);
        assert!(!file_for(dir.path(), 7).exists());
    }
}
