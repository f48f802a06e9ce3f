//! One segment file of the spool: its name, its creation, and walking its records.
//!
//! A segment is named by the ID of its first record, padded to 20 digits so that a directory
//! listing sorts in order (`00000000000000000042.seg`). It starts with
//! [`SEGMENT_HEADER`] and then holds records back to back, each appended whole by one
//! `write`; [`scan`] finds where the good records end, which is where a torn write or damage
//! begins.

use std::fs::{self, File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use drover_protocol::spool::{
    Record, RecordError, SEGMENT_HEADER, check_segment_header, decode_record,
};

use crate::fsutil::{self, Context as _, FileError};

const EXTENSION: &str = ".seg";

/// What the spool knows about one segment file without reading it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Segment {
    /// The ID of its first record (from its name).
    pub first_id: u64,
    /// The file.
    pub path: PathBuf,
    /// Its length: the header and every good record.
    pub bytes: u64,
    /// The ID of its last record; `None` while it holds none.
    pub last_id: Option<u64>,
    /// The number of its first reading (for an empty segment: the next reading's).
    pub first_reading: u64,
    /// One past the number of its last reading.
    pub end_reading: u64,
}

impl Segment {
    /// How many of its readings come after reading number `acked_readings`.
    pub fn readings_after(&self, acked_readings: u64) -> u64 {
        self.end_reading
            .saturating_sub(self.first_reading.max(acked_readings))
    }
}

/// The file name of the segment whose first record is `first_id`.
pub(super) fn path_for(dir: &Path, first_id: u64) -> PathBuf {
    dir.join(format!("{first_id:020}{EXTENSION}"))
}

/// The segment files in `dir` with their first record IDs, in order.
pub(super) fn list(dir: &Path) -> Result<Vec<(u64, PathBuf)>, FileError> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).at("listing", dir)? {
        let entry = entry.at("listing", dir)?;
        let name = entry.file_name();
        let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(EXTENSION)) else {
            continue;
        };
        if stem.len() == 20
            && let Ok(first_id) = stem.parse::<u64>()
        {
            out.push((first_id, entry.path()));
        }
    }
    out.sort_unstable_by_key(|(id, _)| *id);
    Ok(out)
}

/// Creates (or empties) the segment file for `first_id`, writes its header and makes its
/// directory entry durable. The header's own bytes become durable with the first sync of the
/// records after it; until then a power cut leaves a short header, which [`scan`] reports and
/// the spool rewrites.
pub(super) fn create(dir: &Path, first_id: u64) -> Result<(File, PathBuf), FileError> {
    let path = path_for(dir, first_id);
    let mut file = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(fsutil::PUBLIC)
        .open(&path)
        .at("creating", &path)?;
    file.set_len(0).at("emptying", &path)?;
    file.write_all(&SEGMENT_HEADER).at("writing", &path)?;
    fsutil::sync_dir(dir)?;
    Ok((file, path))
}

/// Opens an existing segment file for appending.
pub(super) fn open_append(path: &Path) -> Result<File, FileError> {
    OpenOptions::new()
        .append(true)
        .open(path)
        .at("opening", path)
}

/// Cuts a segment file to `len` bytes, durably.
pub(super) fn truncate(path: &Path, len: u64) -> Result<(), FileError> {
    let file = OpenOptions::new()
        .write(true)
        .open(path)
        .at("opening", path)?;
    file.set_len(len).at("truncating", path)?;
    file.sync_all().at("syncing", path)
}

/// What [`scan`] found in a segment file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Scan {
    /// The header's length plus every good record's; 0 when the header itself is bad.
    pub valid_len: u64,
    /// The ID of the last good record.
    pub last_id: Option<u64>,
    /// The number of the first good record's first reading.
    pub first_reading: Option<u64>,
    /// One past the last good record's last reading.
    pub end_reading: Option<u64>,
    /// Why the scan stopped before the end of the file, and where.
    pub damage: Option<(u64, RecordError)>,
}

/// Walks the records of a segment whose first record should be `first_id`. The good records
/// are the longest run from the start that decode and whose IDs and reading numbers follow
/// each other; the scan stops at the first record that does not.
pub(super) fn scan(bytes: &[u8], first_id: u64) -> Scan {
    let mut scan = Scan {
        valid_len: 0,
        last_id: None,
        first_reading: None,
        end_reading: None,
        damage: None,
    };
    if let Err(e) = check_segment_header(bytes) {
        scan.damage = Some((0, e));
        return scan;
    }
    scan.valid_len = SEGMENT_HEADER.len() as u64;
    let mut expected_id = first_id;
    for (offset, decoded) in Records::new(bytes) {
        let offset = offset as u64;
        let (record, len) = match decoded {
            Ok(decoded) => decoded,
            Err(e) => {
                scan.damage = Some((offset, e));
                break;
            }
        };
        let follows = record.id == expected_id
            && scan
                .end_reading
                .is_none_or(|end| record.first_reading == end);
        if !follows {
            scan.damage = Some((offset, RecordError::Malformed("record out of sequence")));
            break;
        }
        expected_id = record.id.saturating_add(1);
        scan.valid_len = offset + len as u64;
        scan.last_id = Some(record.id);
        scan.first_reading.get_or_insert(record.first_reading);
        scan.end_reading = Some(record.end_reading());
    }
    scan
}

/// The records of a segment file's bytes (after its header), in order, each with its byte
/// offset and encoded length; stops after the first error.
pub(super) struct Records<'a> {
    bytes: &'a [u8],
    offset: usize,
}

impl<'a> Records<'a> {
    /// Records from just after the header. The caller has checked the header (or knows the
    /// file: the spool wrote it).
    pub fn new(bytes: &'a [u8]) -> Records<'a> {
        Records {
            bytes,
            offset: SEGMENT_HEADER.len().min(bytes.len()),
        }
    }
}

impl Iterator for Records<'_> {
    type Item = (usize, Result<(Record, usize), RecordError>);

    fn next(&mut self) -> Option<Self::Item> {
        let offset = self.offset;
        let rest = &self.bytes[offset..];
        if rest.is_empty() {
            return None;
        }
        let result = decode_record(rest);
        self.offset = match &result {
            Ok((_, used)) => offset + used,
            Err(_) => self.bytes.len(),
        };
        Some((offset, result))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_protocol::spool::encode_record;

    use crate::spool::tests::readings;

    fn segment(first_id: u64, counts: &[usize]) -> Vec<u8> {
        let mut bytes = SEGMENT_HEADER.to_vec();
        let mut reading = 10;
        for (i, &n) in counts.iter().enumerate() {
            encode_record(
                first_id + i as u64,
                reading,
                &readings(reading, n),
                &mut bytes,
            )
            .unwrap();
            reading += n as u64;
        }
        bytes
    }

    #[test]
    fn a_clean_segment_scans_whole() {
        let bytes = segment(5, &[1, 3, 2]);
        let scan = scan(&bytes, 5);
        assert_eq!(scan.valid_len, bytes.len() as u64);
        assert_eq!(scan.last_id, Some(7));
        assert_eq!(scan.first_reading, Some(10));
        assert_eq!(scan.end_reading, Some(16));
        assert_eq!(scan.damage, None);
    }

    #[test]
    fn an_empty_or_headless_segment() {
        let scan_empty = scan(&SEGMENT_HEADER, 1);
        assert_eq!(scan_empty.valid_len, 8);
        assert_eq!((scan_empty.last_id, scan_empty.damage), (None, None));
        let short = scan(&SEGMENT_HEADER[..3], 1);
        assert_eq!(short.valid_len, 0);
        assert!(matches!(
            short.damage,
            Some((0, RecordError::Truncated { .. }))
        ));
    }

    #[test]
    fn records_out_of_sequence_end_the_good_run() {
        // Named 4 but starting at 5: nothing in it can be trusted.
        let bytes = segment(5, &[1, 1]);
        let wrong_name = scan(&bytes, 4);
        assert_eq!((wrong_name.valid_len, wrong_name.last_id), (8, None));
        // A record whose reading numbers do not follow on.
        let mut bytes = segment(5, &[2]);
        encode_record(6, 99, &readings(99, 1), &mut bytes).unwrap();
        let gap = scan(&bytes, 5);
        assert_eq!(gap.last_id, Some(5));
        assert!(gap.damage.is_some());
    }

    #[test]
    fn listing_ignores_other_files_and_sorts() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "00000000000000000010.seg",
            "00000000000000000002.seg",
            "state.json",
            "x.seg",
        ] {
            fs::write(dir.path().join(name), b"").unwrap();
        }
        let ids: Vec<u64> = list(dir.path())
            .unwrap()
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        assert_eq!(ids, [2, 10]);
    }
}
