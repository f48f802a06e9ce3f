//! The spool against real files: round trips across segments, IDs across reopens, the bound,
//! and recovery from torn and damaged segments. (Killing a real writer process is
//! `tests/spool_kill.rs`.)

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use drover_protocol::reading::{Channel, ClockState, MeterId, Reading};

use super::*;

/// `n` readings numbered from `first`: the value is the reading's number, so that any record
/// can be checked against its `first_reading`.
pub(crate) fn readings(first: u64, n: usize) -> Vec<Reading> {
    (first..first + n as u64)
        .map(|i| Reading {
            meter: MeterId::parse(&format!("m-{}", i % 3)).unwrap(),
            channel: if i % 2 == 0 {
                Channel::Power
            } else {
                Channel::EnergyImport
            },
            ts_ms: 1_700_000_000_000 + i as i64 * 1000,
            value: i as i64,
            scale: 0,
            clock: ClockState::Synced,
        })
        .collect()
}

/// Small segments so that a few hundred records cross many boundaries; syncs only when asked.
fn small() -> SpoolConfig {
    SpoolConfig {
        max_bytes: 1 << 30,
        segment_bytes: 4096,
        sync_interval: Duration::from_secs(3600),
        sync_bytes: u64::MAX,
    }
}

/// Appends records of 1, 2, 3, 1, 2, 3 ... readings; returns the last ID.
fn fill(spool: &mut Spool, records: usize) -> u64 {
    let mut last = 0;
    for i in 0..records {
        let first = spool.appended_total();
        last = spool.append(&readings(first, 1 + i % 3)).unwrap();
    }
    last
}

/// Every record from the cursor on, checked to be whole, in order and numbered without gaps.
fn read_all(spool: &mut Spool) -> Vec<Record> {
    let records = spool.read(0, usize::MAX).unwrap();
    for pair in records.windows(2) {
        assert_eq!(pair[1].id, pair[0].id + 1);
        assert_eq!(pair[1].first_reading, pair[0].end_reading());
    }
    for record in &records {
        assert_eq!(
            record.readings,
            readings(record.first_reading, record.readings.len())
        );
    }
    records
}

fn segment_files(dir: &Path) -> Vec<PathBuf> {
    segment::list(dir)
        .unwrap()
        .into_iter()
        .map(|(_, p)| p)
        .collect()
}

#[test]
fn append_read_ack_round_trip_across_segments() {
    let dir = tempfile::tempdir().unwrap();
    let mut spool = Spool::open(dir.path(), &small()).unwrap();
    assert_eq!((spool.last_id(), spool.first_unacked_id()), (0, 1));
    assert_eq!(fill(&mut spool, 400), 400);
    // Closing a segment syncs it; the records of the active one are not read until synced.
    let synced = spool.synced_id();
    assert!(synced > 0 && synced < 400, "{synced}");
    let before = spool.read(0, usize::MAX).unwrap();
    assert_eq!(before.last().unwrap().id, synced);
    spool.sync().unwrap();
    let segments = segment_files(dir.path()).len();
    assert!(segments >= 4, "{segments} segments");

    // Reading in bounded steps from the cursor gives every record once, in order.
    let mut from = spool.first_unacked_id();
    let mut seen = Vec::new();
    loop {
        let batch = spool.read(from, 10).unwrap();
        let Some(last) = batch.last() else { break };
        let count: usize = batch.iter().map(|r| r.readings.len()).sum();
        assert!(count <= 10 || batch.len() == 1, "{count}");
        from = last.id + 1;
        seen.extend(batch);
    }
    assert_eq!(seen, read_all(&mut spool));
    assert_eq!(seen.len(), 400);
    assert_eq!(spool.pending_readings(), spool.appended_total());

    // Acknowledging deletes whole segments and survives a reopen.
    spool.ack(250).unwrap();
    assert_eq!(spool.first_unacked_id(), 251);
    assert!(segment_files(dir.path()).len() < segments);
    let pending = spool.pending_readings();
    assert_eq!(
        pending,
        read_all(&mut spool)
            .iter()
            .map(|r| r.readings.len() as u64)
            .sum::<u64>()
    );
    let bytes = spool.bytes();
    drop(spool);
    let mut spool = Spool::open(dir.path(), &small()).unwrap();
    assert_eq!(spool.first_unacked_id(), 251);
    assert_eq!(spool.pending_readings(), pending);
    assert_eq!(spool.bytes(), bytes);
    assert_eq!(read_all(&mut spool).first().unwrap().id, 251);
    assert_eq!(
        spool.append(&readings(spool.appended_total(), 1)).unwrap(),
        401
    );

    // An old or repeated acknowledgement is harmless; one beyond what is durable is refused.
    spool.ack(100).unwrap();
    assert_eq!(spool.first_unacked_id(), 251);
    let err = spool.ack(401).unwrap_err();
    assert!(
        matches!(
            err,
            SpoolError::AckBeyondSynced {
                through: 401,
                synced: 400
            }
        ),
        "{err}"
    );
}

#[test]
fn ids_are_never_reused_even_when_everything_was_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let mut spool = Spool::open(dir.path(), &small()).unwrap();
    fill(&mut spool, 100);
    spool.sync().unwrap();
    let appended = spool.appended_total();
    spool.ack(100).unwrap();
    assert_eq!(spool.pending_readings(), 0);
    assert_eq!(
        segment_files(dir.path()).len(),
        1,
        "only the active segment is left"
    );
    drop(spool);

    let mut spool = Spool::open(dir.path(), &small()).unwrap();
    assert_eq!(spool.append(&readings(appended, 1)).unwrap(), 101);
    spool.sync().unwrap();
    spool.ack(101).unwrap();
    drop(spool);

    // Even with every segment file gone, the persisted cursor carries the IDs on.
    for path in segment_files(dir.path()) {
        fs::remove_file(path).unwrap();
    }
    let mut spool = Spool::open(dir.path(), &small()).unwrap();
    assert_eq!(spool.appended_total(), appended + 1);
    assert_eq!(spool.append(&readings(appended + 1, 2)).unwrap(), 102);
    spool.sync().unwrap();
    assert_eq!(read_all(&mut spool).len(), 1);
    assert_eq!(spool.dropped_total(), 0);
}

#[test]
fn a_full_spool_drops_the_oldest_segments_and_counts_them_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let config = SpoolConfig {
        max_bytes: 4 * 4096,
        ..small()
    };
    let mut spool = Spool::open(dir.path(), &config).unwrap();
    fill(&mut spool, 100);
    spool.sync().unwrap();
    // Acknowledged readings are not counted when their segment is dropped.
    spool.ack(10).unwrap();
    assert_eq!(spool.dropped_total(), 0);
    fill(&mut spool, 900);
    spool.sync().unwrap();
    assert!(spool.bytes() <= config.max_bytes, "{}", spool.bytes());

    let records = read_all(&mut spool);
    let kept: u64 = records.iter().map(|r| r.readings.len() as u64).sum();
    let last = records.last().unwrap();
    assert_eq!(
        (last.id, last.end_reading()),
        (1000, spool.appended_total())
    );
    assert_eq!(spool.pending_readings(), kept);
    // What was appended is acknowledged, dropped or still there: nothing else.
    let acked: u64 = readings_through(10);
    assert_eq!(spool.dropped_total(), spool.appended_total() - acked - kept);
    assert!(spool.dropped_total() > 1000);
    assert_eq!(spool.first_unacked_id(), records[0].id);

    let dropped = spool.dropped_total();
    drop(spool);
    let mut spool = Spool::open(dir.path(), &config).unwrap();
    assert_eq!(
        spool.dropped_total(),
        dropped,
        "the count survives a reopen"
    );
    assert_eq!(read_all(&mut spool), records);
}

/// Readings in records 1 ..= `id` as [`fill`] makes them (1, 2, 3, 1, 2, 3 ...).
fn readings_through(id: u64) -> u64 {
    (0..id).map(|i| 1 + i % 3).sum()
}

/// A spool with a few segments, synced and closed; returns its last record's ID.
fn template(dir: &Path, records: usize) -> u64 {
    let mut spool = Spool::open(dir, &small()).unwrap();
    let last = fill(&mut spool, records);
    spool.sync().unwrap();
    last
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

/// The byte offset where each record of a segment file starts.
fn record_offsets(path: &Path) -> Vec<(u64, usize)> {
    let bytes = fs::read(path).unwrap();
    Records::new(&bytes)
        .map(|(offset, r)| (r.unwrap().0.id, offset))
        .collect()
}

#[test]
fn a_torn_last_record_is_cut_at_every_byte_and_behind_any_garbage() {
    let base = tempfile::tempdir().unwrap();
    let template_dir = base.path().join("template");
    let last = template(&template_dir, 150);
    let last_segment = segment_files(&template_dir).pop().unwrap();
    let name = last_segment.file_name().unwrap().to_owned();
    let original = fs::read(&last_segment).unwrap();
    let full_len = original.len();
    let (last_id, start) = *record_offsets(&last_segment).last().unwrap();
    assert_eq!(last_id, last);
    assert!(
        start > 8,
        "the last segment holds more than the last record"
    );

    let garbage: [&[u8]; 4] = [b"", &[0; 4096], &[0xff; 100], b"\x17\0\0\0 not a record"];
    let mut case = 0;
    for cut in start..=full_len {
        for tail in garbage {
            case += 1;
            let dir = base.path().join(format!("case-{case}"));
            copy_dir(&template_dir, &dir);
            let path = dir.join(&name);
            let mut bytes = fs::read(&path).unwrap();
            bytes.truncate(cut);
            bytes.extend_from_slice(tail);
            fs::write(&path, &bytes).unwrap();

            // Garbage can complete a cut record by chance: a record ends with its last
            // reading's clock state, 0 for "synced", and a tail of zeros puts it back.
            let complete = bytes.starts_with(&original);
            let whole = if complete { last } else { last - 1 };

            let mut spool = Spool::open(&dir, &small()).unwrap();
            assert_eq!(spool.last_id(), whole, "cut at {cut}, tail {tail:?}");
            assert_eq!(read_all(&mut spool).len() as u64, whole);
            assert_eq!(spool.dropped_total(), 0, "a torn tail is not a drop");
            let expected_len = if complete { full_len } else { start };
            assert_eq!(fs::metadata(&path).unwrap().len() as usize, expected_len);
            // Appending continues where the good records end, and reopens cleanly.
            let id = spool.append(&readings(spool.appended_total(), 2)).unwrap();
            assert_eq!(id, whole + 1);
            drop(spool);
            let mut spool = Spool::open(&dir, &small()).unwrap();
            assert_eq!(read_all(&mut spool).len() as u64, whole + 1);
            drop(spool);
            fs::remove_dir_all(&dir).unwrap();
        }
    }
}

#[test]
fn a_damaged_middle_segment_is_skipped_and_its_loss_counted_once() {
    let dir = tempfile::tempdir().unwrap();
    let last = template(dir.path(), 400);
    let files = segment_files(dir.path());
    assert!(files.len() >= 4);
    let victim = &files[1];
    let offsets = record_offsets(victim);
    let (damaged_id, offset) = offsets[offsets.len() / 2];
    let (last_in_victim, _) = *offsets.last().unwrap();
    let mut bytes = fs::read(victim).unwrap();
    bytes[offset + 10] ^= 0x40;
    fs::write(victim, &bytes).unwrap();

    let mut spool = Spool::open(dir.path(), &small()).unwrap();
    let lost = readings_through(last_in_victim) - readings_through(damaged_id - 1);
    assert_eq!(spool.dropped_total(), lost);
    let records = spool.read(0, usize::MAX).unwrap();
    let ids: Vec<u64> = records.iter().map(|r| r.id).collect();
    let expected: Vec<u64> = (1..damaged_id).chain(last_in_victim + 1..=last).collect();
    assert_eq!(ids, expected);
    assert_eq!(spool.pending_readings(), readings_through(last) - lost);
    drop(spool);

    // The damage was cut away and counted; a reopen counts nothing new.
    let mut spool = Spool::open(dir.path(), &small()).unwrap();
    assert_eq!(spool.dropped_total(), lost);
    assert_eq!(spool.read(0, usize::MAX).unwrap(), records);
}

#[test]
fn a_segment_without_its_header_is_lost_whole_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let last = template(dir.path(), 400);
    let files = segment_files(dir.path());
    let victim = &files[2];
    let offsets = record_offsets(victim);
    let (first, last_in_victim) = (offsets[0].0, offsets.last().unwrap().0);
    let mut bytes = fs::read(victim).unwrap();
    bytes[..8].copy_from_slice(b"garbage!");
    fs::write(victim, &bytes).unwrap();

    let mut spool = Spool::open(dir.path(), &small()).unwrap();
    assert!(!victim.exists());
    let lost = readings_through(last_in_victim) - readings_through(first - 1);
    assert_eq!(spool.dropped_total(), lost);
    assert_eq!(
        spool.read(0, usize::MAX).unwrap().len() as u64,
        last - (last_in_victim - first + 1)
    );
}

/// Flips one bit of a file in place, as a failing SD card would, leaving its length alone.
fn flip_bit(path: &Path, at: usize) {
    use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
    let mut file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut byte = [0];
    file.seek(SeekFrom::Start(at as u64)).unwrap();
    file.read_exact(&mut byte).unwrap();
    file.seek(SeekFrom::Start(at as u64)).unwrap();
    file.write_all(&[byte[0] ^ 0x40]).unwrap();
}

fn ids(records: &[Record]) -> Vec<u64> {
    records.iter().map(|r| r.id).collect()
}

#[test]
fn damage_found_while_open_loses_the_rest_of_its_segment_counted_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut spool = Spool::open(dir.path(), &small()).unwrap();
    let last = fill(&mut spool, 150);
    spool.sync().unwrap();
    let files = segment_files(dir.path());
    assert!(files.len() >= 2, "{} segments", files.len());
    let victim = &files[0];
    let offsets = record_offsets(victim);
    let (damaged_id, offset) = offsets[offsets.len() / 2];
    let (last_in_victim, _) = *offsets.last().unwrap();
    // Whole when the spool was opened; damaged while it is open.
    flip_bit(victim, offset + 10);

    let records = spool.read(0, usize::MAX).unwrap();
    let expected: Vec<u64> = (1..damaged_id).chain(last_in_victim + 1..=last).collect();
    assert_eq!(ids(&records), expected);
    let lost = readings_through(last_in_victim) - readings_through(damaged_id - 1);
    assert_eq!(spool.dropped_total(), lost);
    assert_eq!(spool.pending_readings(), readings_through(last) - lost);
    assert_eq!(fs::metadata(victim).unwrap().len(), offset as u64);
    // The damaged part is gone: reading again returns the same and counts nothing new.
    assert_eq!(spool.read(0, usize::MAX).unwrap(), records);
    assert_eq!(spool.dropped_total(), lost);
    assert_eq!(
        spool.append(&readings(spool.appended_total(), 1)).unwrap(),
        last + 1
    );
    spool.sync().unwrap();
    drop(spool);

    let mut spool = Spool::open(dir.path(), &small()).unwrap();
    assert_eq!(spool.dropped_total(), lost, "a reopen counts nothing again");
    let mut expected = expected;
    expected.push(last + 1);
    assert_eq!(ids(&spool.read(0, usize::MAX).unwrap()), expected);
}

#[test]
fn damage_found_while_open_in_the_segment_appended_to_moves_appends_to_a_new_one() {
    let dir = tempfile::tempdir().unwrap();
    let mut spool = Spool::open(dir.path(), &small()).unwrap();
    let last = fill(&mut spool, 150);
    spool.sync().unwrap();
    let files = segment_files(dir.path());
    assert!(files.len() >= 2, "{} segments", files.len());
    let victim = files.last().unwrap();
    let offsets = record_offsets(victim);
    assert!(offsets.len() >= 3, "{} records", offsets.len());
    let (damaged_id, offset) = offsets[offsets.len() / 2];
    flip_bit(victim, offset + 10);

    let records = spool.read(0, usize::MAX).unwrap();
    assert_eq!(ids(&records), (1..damaged_id).collect::<Vec<_>>());
    let lost = readings_through(last) - readings_through(damaged_id - 1);
    assert_eq!(spool.dropped_total(), lost);
    assert_eq!(spool.read(0, usize::MAX).unwrap(), records);
    assert_eq!(spool.dropped_total(), lost, "a second read counts nothing");
    assert_eq!(fs::metadata(victim).unwrap().len(), offset as u64);

    // Appending goes on with fresh IDs and reading numbers, in a new segment.
    let appended = spool.appended_total();
    assert_eq!(appended, readings_through(last));
    assert_eq!(spool.append(&readings(appended, 2)).unwrap(), last + 1);
    spool.sync().unwrap();
    assert_eq!(
        segment_files(dir.path()).last().unwrap(),
        &segment::path_for(dir.path(), last + 1)
    );
    let fresh = spool.read(damaged_id, usize::MAX).unwrap();
    assert_eq!(fresh.len(), 1);
    assert_eq!(fresh[0].id, last + 1);
    assert_eq!(fresh[0].readings, readings(appended, 2));
    assert_eq!(spool.dropped_total(), lost);
    drop(spool);

    let mut spool = Spool::open(dir.path(), &small()).unwrap();
    assert_eq!(spool.dropped_total(), lost, "a reopen counts nothing again");
    let mut expected = ids(&records);
    expected.push(last + 1);
    assert_eq!(ids(&spool.read(0, usize::MAX).unwrap()), expected);
    assert_eq!(
        spool.append(&readings(spool.appended_total(), 1)).unwrap(),
        last + 2
    );
}

#[test]
fn ids_lost_to_damage_found_while_open_stay_taken_across_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let mut spool = Spool::open(dir.path(), &small()).unwrap();
    let last = fill(&mut spool, 150);
    spool.sync().unwrap();
    let victim = segment_files(dir.path()).pop().unwrap();
    let (damaged_id, offset) = record_offsets(&victim)[1];
    flip_bit(&victim, offset + 10);
    assert_eq!(
        spool.read(0, usize::MAX).unwrap().len() as u64,
        damaged_id - 1
    );
    let (appended, dropped) = (spool.appended_total(), spool.dropped_total());
    // Reopened before anything was appended after the damage: records up to `last` may have
    // been read, so neither their IDs nor their reading numbers may be given out again.
    drop(spool);

    let mut spool = Spool::open(dir.path(), &small()).unwrap();
    assert_eq!(spool.dropped_total(), dropped);
    assert_eq!(spool.appended_total(), appended);
    assert_eq!(spool.append(&readings(appended, 1)).unwrap(), last + 1);
    spool.sync().unwrap();
    drop(spool);
    let mut spool = Spool::open(dir.path(), &small()).unwrap();
    assert_eq!(spool.dropped_total(), dropped);
    assert_eq!(
        spool.read(0, usize::MAX).unwrap().last().unwrap().id,
        last + 1
    );
}

#[test]
fn a_new_segment_cut_short_by_a_power_cut_is_started_again() {
    let dir = tempfile::tempdir().unwrap();
    let mut spool = Spool::open(dir.path(), &small()).unwrap();
    fill(&mut spool, 50);
    spool.sync().unwrap();
    drop(spool);
    // The state a power cut right after a segment was created can leave: an empty or partial
    // header in a file named by the next ID.
    for header in [&b""[..], b"DRSP"] {
        let path = segment::path_for(dir.path(), 51);
        fs::write(&path, header).unwrap();
        let mut spool = Spool::open(dir.path(), &small()).unwrap();
        assert_eq!(spool.last_id(), 50);
        assert_eq!(fs::read(&path).unwrap(), SEGMENT_HEADER);
        let id = spool.append(&readings(spool.appended_total(), 1)).unwrap();
        assert_eq!(id, 51);
        drop(spool);
        let mut spool = Spool::open(dir.path(), &small()).unwrap();
        assert_eq!(read_all(&mut spool).len(), 51);
        drop(spool);
        fs::remove_file(&path).unwrap();
    }
}

#[test]
fn acknowledged_records_lost_from_the_last_segment_do_not_reuse_ids() {
    let dir = tempfile::tempdir().unwrap();
    let mut spool = Spool::open(dir.path(), &small()).unwrap();
    fill(&mut spool, 20);
    spool.sync().unwrap();
    spool.ack(20).unwrap();
    drop(spool);
    // Damage takes the acknowledged tail; the cursor still says 20 were given out.
    let path = segment_files(dir.path()).pop().unwrap();
    let (_, offset) = record_offsets(&path)[5];
    let file = fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.set_len(offset as u64).unwrap();
    drop(file);
    let mut spool = Spool::open(dir.path(), &small()).unwrap();
    assert_eq!(
        spool.append(&readings(spool.appended_total(), 1)).unwrap(),
        21
    );
    drop(spool);
    let mut spool = Spool::open(dir.path(), &small()).unwrap();
    assert_eq!(
        read_all(&mut spool)
            .iter()
            .map(|r| r.id)
            .collect::<Vec<_>>(),
        [21]
    );
    assert_eq!(
        spool.dropped_total(),
        0,
        "only acknowledged records were lost"
    );
}

#[test]
fn a_damaged_state_file_falls_back_to_sending_everything_kept() {
    let dir = tempfile::tempdir().unwrap();
    let mut spool = Spool::open(dir.path(), &small()).unwrap();
    fill(&mut spool, 100);
    spool.sync().unwrap();
    spool.ack(60).unwrap();
    let oldest_kept = segment_files(dir.path())[0].clone();
    drop(spool);
    fs::write(dir.path().join(state::FILE), b"{torn").unwrap();
    let mut spool = Spool::open(dir.path(), &small()).unwrap();
    let first = record_offsets(&oldest_kept)[0].0;
    assert!(first <= 61);
    assert_eq!(spool.first_unacked_id(), first);
    assert_eq!(read_all(&mut spool).len() as u64, 100 - first + 1);
    assert_eq!(spool.dropped_total(), 0);
    assert_eq!(
        spool.append(&readings(spool.appended_total(), 1)).unwrap(),
        101
    );
}

#[test]
fn sync_follows_bytes_and_interval() {
    let dir = tempfile::tempdir().unwrap();
    let config = SpoolConfig {
        sync_bytes: 200,
        ..small()
    };
    let mut spool = Spool::open(dir.path(), &config).unwrap();
    assert_eq!(spool.sync_due_in(), None);
    spool.append(&readings(0, 1)).unwrap();
    assert_eq!(spool.synced_id(), 0);
    assert!(spool.sync_due_in().is_some());
    // A big record passes sync_bytes at once.
    spool.append(&readings(1, 40)).unwrap();
    assert_eq!(spool.synced_id(), 2);
    assert_eq!(spool.sync_due_in(), None);

    let config = SpoolConfig {
        sync_interval: Duration::ZERO,
        ..small()
    };
    drop(spool);
    let mut spool = Spool::open(dir.path(), &config).unwrap();
    spool.append(&readings(41, 1)).unwrap();
    assert_eq!(spool.synced_id(), 3, "a zero interval syncs every append");
}

#[test]
fn a_second_open_of_the_same_spool_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path(), &small()).unwrap();
    let err = Spool::open(dir.path(), &small()).unwrap_err();
    assert!(matches!(err, SpoolError::Locked(_)), "{err}");
    drop(spool);
    Spool::open(dir.path(), &small()).unwrap();
}

#[test]
fn appends_that_cannot_be_records_are_refused_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let mut spool = Spool::open(dir.path(), &small()).unwrap();
    let err = spool.append(&[]).unwrap_err();
    assert!(
        matches!(err, SpoolError::Encode(EncodeError::Empty)),
        "{err}"
    );
    let too_many = readings(0, MAX_RECORD_READINGS + 1);
    spool.append(&too_many).unwrap_err();
    assert_eq!(spool.dropped_total(), too_many.len() as u64);
    assert_eq!(spool.last_id(), 0);
}
