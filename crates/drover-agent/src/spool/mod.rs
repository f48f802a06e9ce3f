//! The spool: meter readings on disk, between the meter sources and the sender. Append-only,
//! fsync'd in groups, bounded, and crash-safe; the seed's Modbus reader kept its buffer in
//! memory and lost it at every power cut (seed-systems.md §4 item 14).
//!
//! ```text
//! <state_dir>/spool/
//!   00000000000000000001.seg   segment files, named by their first record's ID, each a
//!   00000000000000004711.seg   header and checksummed records (drover_protocol::spool)
//!   state.json                 acknowledged cursor, dropped count (self::state)
//!   lock                       held while a Spool is open, so only one process writes
//! ```
//!
//! Each [`Spool::append`] stores one record: a new record ID (one more than the last; IDs are
//! never reused once a record could have been read) and the readings, numbered on from the
//! previous record's. Records are read back in order from the acknowledged cursor; once the hub
//! has acknowledged them, [`Spool::ack`] moves the cursor (persisted in `state.json`) and deletes
//! segments that hold only acknowledged records.
//!
//! **Durability.** `append` writes the record to the file before it returns, so killing the
//! agent (`kill -9`, a panic, the OOM killer) loses nothing that was appended. The file is
//! fsync'd in groups: when `sync_bytes` have accumulated, when an append finds the oldest
//! unsynced record older than `sync_interval`, when [`task::run`] finds the interval passed, at
//! shutdown, and before a segment is closed. A power cut or kernel crash therefore loses at most
//! the records appended since the last sync: those of the last `sync_interval` (1 s by default)
//! while the spool task runs, or fewer when `sync_bytes` came first. [`Spool::read`] returns
//! only synced records, so the sender never sends a record that a power cut could take back,
//! and the lost records' IDs, which nobody has seen, are given out again.
//!
//! **Bound.** Before an append would take the segments past `max_bytes`, whole oldest segments
//! are dropped: their unacknowledged readings are added to [`Spool::dropped_total`] (persisted,
//! logged as a warning, and for the sender to report to the hub) and the cursor moves past them.
//! Readings that a failed write could not store are counted the same way.
//!
//! **Recovery.** [`Spool::open`] reads every segment. The last one may end in a torn record
//! after a power cut: it is cut back to its last whole record (damage there cannot be told from
//! a torn write, so nothing is counted; the bytes cut are logged). Damage anywhere else (a
//! record that fails its checksum, a missing header) loses the rest of that segment: the file
//! is cut there and the lost readings, known from the reading numbers of the records on either
//! side, are counted as dropped and logged, once. Damage that appears while the spool is open
//! (a failing SD card) is dealt with by the same rule when [`Spool::read`] or [`Spool::ack`]
//! meets it, instead of failing every read until a restart: the rest of that segment is given
//! up, its readings are counted as dropped and logged, once, and reading goes on after it. A
//! damaged segment that is still appended to is closed first, so appending goes on in a new
//! segment and never after garbage, and the IDs handed out stay taken.

mod recovery;
mod segment;
mod state;
pub mod task;

#[cfg(test)]
pub(crate) mod tests;

use std::fs::{self, File};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use drover_protocol::reading::Reading;
use drover_protocol::spool::{EncodeError, RecordError, SEGMENT_HEADER, encode_record};

pub use drover_protocol::spool::{MAX_RECORD_READINGS, Record};

use self::segment::{Records, Segment};
use self::state::State;
use crate::config::SpoolConfig;
use crate::fsutil::{self, Context as _, FileError};

const LOCK_FILE: &str = "lock";
/// How long [`Spool::open`] waits for another holder of the lock to let go.
const LOCK_WAIT: Duration = Duration::from_secs(1);

/// Why a spool operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// A file operation failed.
    #[error(transparent)]
    File(#[from] FileError),
    /// The readings cannot be one record (none, or more than [`MAX_RECORD_READINGS`]).
    #[error(transparent)]
    Encode(#[from] EncodeError),
    /// Another process has the spool open.
    #[error("the spool {} is in use by another process", .0.display())]
    Locked(PathBuf),
    /// A record no longer decodes, and the spool found no damage it could give up (it gives
    /// up what it can; see the module documentation).
    #[error("spool segment {} is damaged at byte {offset}: {source}", path.display())]
    Damaged {
        /// The segment file.
        path: PathBuf,
        /// Where the damage starts.
        offset: u64,
        /// What is wrong.
        source: RecordError,
    },
    /// An acknowledgement names a record that is not durable yet, or does not exist.
    #[error("cannot acknowledge record {through}: records are durable only through {synced}")]
    AckBeyondSynced {
        /// The ID acknowledged.
        through: u64,
        /// The last durable record's ID.
        synced: u64,
    },
    /// A thread panicked while it held the spool.
    #[error("the spool's lock was poisoned by a panic")]
    Poisoned,
}

/// The on-disk queue of readings. Not thread-safe by itself: share it as a
/// [`task::SharedSpool`].
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    config: SpoolConfig,
    /// Oldest first; the last one is the one appended to. Never empty.
    segments: Vec<Segment>,
    /// The last segment, open for appending.
    file: File,
    state: State,
    next_id: u64,
    next_reading: u64,
    /// Records up to this ID are fsync'd.
    synced_id: u64,
    unsynced_bytes: u64,
    /// When the oldest unsynced record was appended.
    unsynced_since: Option<Instant>,
    /// A failed write may have left part of a record at the end of the file: start a new
    /// segment before the next append.
    tail_unclean: bool,
    total_bytes: u64,
    /// Encoding buffer, kept to avoid an allocation per append.
    buf: Vec<u8>,
    _lock: File,
}

impl Spool {
    /// Opens the spool in `dir` (creating it if needed), recovering from whatever a crash or
    /// power cut left; see the module documentation.
    pub fn open(dir: &Path, config: &SpoolConfig) -> Result<Spool, SpoolError> {
        fsutil::create_dir_all(dir, 0o700)?;
        let lock = lock(dir)?;
        let loaded = match State::load(dir) {
            Ok(state) => state,
            Err(e) => {
                // It is written atomically, so this is damage from outside; the segments are
                // still worth sending (the hub drops what it already has).
                tracing::error!(error = %e, "spool state unreadable; starting over from the oldest segment");
                None
            }
        };
        let segments = recovery::recover(dir)?;
        let mut state = loaded.unwrap_or_else(|| {
            let first = segments.iter().find(|s| s.last_id.is_some());
            State {
                acked_through: first.map_or(0, |s| s.first_id.saturating_sub(1)),
                acked_readings: first.map_or(0, |s| s.first_reading),
                ..State::default()
            }
        });
        let lost = recovery::count_damage(&segments, &mut state);
        if lost > 0 {
            state.dropped_total += lost;
            tracing::warn!(
                lost,
                dropped_total = state.dropped_total,
                "spool: readings lost to damaged segments were counted as dropped"
            );
            state.save(dir)?;
        }

        let last_record = segments.iter().rev().find_map(|s| s.last_id);
        // An empty last segment was named by the next ID when it was started. Damage may have
        // taken the records before it since, and those could have been read, so their IDs stay
        // taken; likewise the reading numbers counted as lost to damage.
        let started_at = segments
            .last()
            .filter(|s| s.last_id.is_none())
            .map_or(0, |s| s.first_id);
        let next_id = state
            .acked_through
            .max(last_record.unwrap_or(0))
            .saturating_add(1)
            .max(started_at);
        let next_reading = segments
            .iter()
            .rev()
            .find(|s| s.last_id.is_some())
            .map_or(0, |s| s.end_reading)
            .max(state.acked_readings)
            .max(state.damage_counted_to);

        let (segments, file) = recovery::settle(dir, segments, &state, next_id, next_reading)?;
        let total_bytes = segments.iter().map(|s| s.bytes).sum();
        Ok(Spool {
            dir: dir.to_path_buf(),
            config: config.clone(),
            segments,
            file,
            state,
            next_id,
            next_reading,
            synced_id: next_id - 1,
            unsynced_bytes: 0,
            unsynced_since: None,
            tail_unclean: false,
            total_bytes,
            buf: Vec::new(),
            _lock: lock,
        })
    }

    /// Stores the readings as one record and returns its ID. The record is in the file when
    /// this returns, and durable after the next sync (which this starts itself when one is
    /// due). Readings that cannot be stored are counted in [`Spool::dropped_total`].
    pub fn append(&mut self, readings: &[Reading]) -> Result<u64, SpoolError> {
        match self.try_append(readings) {
            Ok(id) => {
                if self.sync_due()
                    && let Err(e) = self.sync()
                {
                    // The record is written; the next sync tries again.
                    tracing::error!(error = %e, "spool: fsync failed");
                }
                Ok(id)
            }
            Err(e) => {
                self.count_lost(readings.len() as u64, &e);
                Err(e)
            }
        }
    }

    /// Makes every appended record durable.
    pub fn sync(&mut self) -> Result<(), SpoolError> {
        if self.synced_id == self.last_id() {
            return Ok(());
        }
        let path = &self.active().path;
        self.file.sync_data().at("syncing", path)?;
        self.synced_id = self.last_id();
        self.unsynced_bytes = 0;
        self.unsynced_since = None;
        Ok(())
    }

    /// How long until the oldest unsynced record is `sync_interval` old; `None` when every
    /// record is synced.
    pub fn sync_due_in(&self) -> Option<Duration> {
        self.unsynced_since
            .map(|since| self.config.sync_interval.saturating_sub(since.elapsed()))
    }

    /// Syncs if `sync_interval` has passed since the oldest unsynced append, or `sync_bytes`
    /// wait.
    pub fn sync_if_due(&mut self) -> Result<(), SpoolError> {
        if self.sync_due() {
            self.sync()?;
        }
        Ok(())
    }

    /// Up to `max_readings` readings (but always at least one whole record when there is one)
    /// in records from `from_id` on, skipping what the cursor has passed. Only synced records
    /// are returned. Damage met on the way is given up and counted as dropped (see the module
    /// documentation), and the records after it are returned.
    pub fn read(&mut self, from_id: u64, max_readings: usize) -> Result<Vec<Record>, SpoolError> {
        self.past_damage(|spool| spool.read_synced(from_id, max_readings))
    }

    fn read_synced(&self, from_id: u64, max_readings: usize) -> Result<Vec<Record>, SpoolError> {
        let start = from_id.max(self.first_unacked_id());
        let mut out = Vec::new();
        let mut count = 0;
        if max_readings == 0 {
            return Ok(out);
        }
        for segment in &self.segments {
            if segment.last_id.is_none_or(|last| last < start) {
                continue;
            }
            if segment.first_id > self.synced_id {
                break;
            }
            let bytes = fs::read(&segment.path).at("reading", &segment.path)?;
            let bytes = bytes.get(..segment.bytes as usize).unwrap_or(&bytes);
            for (offset, record) in Records::new(bytes) {
                let (record, _) = record.map_err(|source| SpoolError::Damaged {
                    path: segment.path.clone(),
                    offset: offset as u64,
                    source,
                })?;
                if record.id < start {
                    continue;
                }
                if record.id > self.synced_id
                    || (count > 0 && count + record.readings.len() > max_readings)
                {
                    return Ok(out);
                }
                count += record.readings.len();
                out.push(record);
                if count >= max_readings {
                    return Ok(out);
                }
            }
        }
        Ok(out)
    }

    /// Marks every record up to `through_id` as done (the hub acknowledged it): the cursor is
    /// persisted and segments holding only acknowledged records are deleted. Acknowledging
    /// what the cursor has already passed does nothing.
    pub fn ack(&mut self, through_id: u64) -> Result<(), SpoolError> {
        if through_id <= self.state.acked_through {
            return Ok(());
        }
        if through_id > self.synced_id {
            return Err(SpoolError::AckBeyondSynced {
                through: through_id,
                synced: self.synced_id,
            });
        }
        let end = self.past_damage(|spool| spool.first_reading_after(through_id))?;
        self.state.acked_through = through_id;
        self.state.acked_readings = self.state.acked_readings.max(end);
        self.state.save(&self.dir)?;
        self.delete_acked()
    }

    /// The ID of the oldest record not yet acknowledged (or dropped); it may not exist yet.
    pub fn first_unacked_id(&self) -> u64 {
        self.state.acked_through.saturating_add(1)
    }

    /// The ID of the last record appended (0 before the first).
    pub fn last_id(&self) -> u64 {
        self.next_id - 1
    }

    /// The ID of the last durable record: [`Spool::read`] returns records up to here.
    pub fn synced_id(&self) -> u64 {
        self.synced_id
    }

    /// Readings appended and neither acknowledged nor dropped.
    pub fn pending_readings(&self) -> u64 {
        self.segments
            .iter()
            .filter(|s| s.last_id.is_some_and(|id| id > self.state.acked_through))
            .map(|s| s.readings_after(self.state.acked_readings))
            .sum()
    }

    /// Readings appended over the spool's life: the number the next reading gets.
    pub fn appended_total(&self) -> u64 {
        self.next_reading
    }

    /// The bytes the segment files take.
    pub fn bytes(&self) -> u64 {
        self.total_bytes
    }

    /// Readings dropped over the spool's life (full spool, damage, failed writes); persisted.
    pub fn dropped_total(&self) -> u64 {
        self.state.dropped_total
    }

    fn try_append(&mut self, readings: &[Reading]) -> Result<u64, SpoolError> {
        let id = self.next_id;
        self.buf.clear();
        encode_record(id, self.next_reading, readings, &mut self.buf)?;
        let len = self.buf.len() as u64;
        let active = self.active();
        if self.tail_unclean
            || (active.last_id.is_some() && active.bytes + len > self.config.segment_bytes)
        {
            self.roll()?;
        }
        while self.total_bytes + len > self.config.max_bytes && self.segments.len() > 1 {
            self.drop_oldest()?;
        }
        if let Err(e) = self.file.write_all(&self.buf) {
            // Cut off whatever part of the record reached the file; if even that fails, the
            // next append starts a new segment and the next open cuts it.
            self.tail_unclean = self.file.set_len(self.active().bytes).is_err();
            return Err(FileError::new("appending to", &self.active().path, e).into());
        }
        let count = readings.len() as u64;
        let active = self.active_mut();
        active.bytes += len;
        active.last_id = Some(id);
        active.end_reading += count;
        self.total_bytes += len;
        self.next_id += 1;
        self.next_reading += count;
        self.unsynced_bytes += len;
        self.unsynced_since.get_or_insert_with(Instant::now);
        Ok(id)
    }

    fn sync_due(&self) -> bool {
        self.unsynced_bytes >= self.config.sync_bytes
            || self.sync_due_in().is_some_and(|d| d.is_zero())
    }

    /// Closes the active segment (synced) and starts a new one.
    fn roll(&mut self) -> Result<(), SpoolError> {
        self.sync()?;
        let (file, path) = segment::create(&self.dir, self.next_id)?;
        self.file = file;
        self.segments.push(Segment {
            first_id: self.next_id,
            path,
            bytes: SEGMENT_HEADER.len() as u64,
            last_id: None,
            first_reading: self.next_reading,
            end_reading: self.next_reading,
        });
        self.total_bytes += SEGMENT_HEADER.len() as u64;
        self.tail_unclean = false;
        // The closed segment may be fully acknowledged already.
        self.delete_acked()
    }

    /// Drops the oldest segment to make room, counting its unacknowledged readings.
    fn drop_oldest(&mut self) -> Result<(), SpoolError> {
        let oldest = self.segments[0].clone();
        let dropped = oldest.readings_after(self.state.acked_readings);
        if let Some(last) = oldest.last_id {
            self.state.acked_through = self.state.acked_through.max(last);
            self.state.acked_readings = self.state.acked_readings.max(oldest.end_reading);
        }
        self.state.dropped_total += dropped;
        self.state.save(&self.dir)?;
        tracing::warn!(
            dropped,
            dropped_total = self.state.dropped_total,
            through_id = oldest.last_id.unwrap_or(0),
            "spool full: dropped the oldest segment"
        );
        fsutil::remove_if_exists(&oldest.path)?;
        fsutil::sync_dir(&self.dir)?;
        self.segments.remove(0);
        self.total_bytes -= oldest.bytes;
        Ok(())
    }

    /// Deletes the segments before the active one that hold only acknowledged records.
    fn delete_acked(&mut self) -> Result<(), SpoolError> {
        let acked = self.state.acked_through;
        let mut removed = false;
        while self.segments.len() > 1 && self.segments[0].last_id.is_none_or(|id| id <= acked) {
            let segment = self.segments.remove(0);
            fsutil::remove_if_exists(&segment.path)?;
            self.total_bytes -= segment.bytes;
            removed = true;
        }
        if removed {
            fsutil::sync_dir(&self.dir)?;
        }
        Ok(())
    }

    /// The number of the first reading of the first record after `id`.
    fn first_reading_after(&self, id: u64) -> Result<u64, SpoolError> {
        let Some(segment) = self
            .segments
            .iter()
            .find(|s| s.last_id.is_some_and(|last| last > id))
        else {
            return Ok(self.next_reading);
        };
        if segment.first_id > id {
            return Ok(segment.first_reading);
        }
        let bytes = fs::read(&segment.path).at("reading", &segment.path)?;
        let bytes = bytes.get(..segment.bytes as usize).unwrap_or(&bytes);
        for (offset, record) in Records::new(bytes) {
            match record {
                Ok((record, _)) if record.id > id => return Ok(record.first_reading),
                Ok(_) => {}
                Err(source) => {
                    return Err(SpoolError::Damaged {
                        path: segment.path.clone(),
                        offset: offset as u64,
                        source,
                    });
                }
            }
        }
        Ok(segment.end_reading)
    }

    /// Runs `f`, which reads segments; when it meets damage, gives that up and runs `f` again.
    /// Each round cuts the damaged segment shorter, so this ends.
    fn past_damage<T>(
        &mut self,
        f: impl Fn(&Spool) -> Result<T, SpoolError>,
    ) -> Result<T, SpoolError> {
        loop {
            match f(self) {
                Err(SpoolError::Damaged {
                    path,
                    offset,
                    source,
                }) => {
                    if !self.give_up_damage(&path)? {
                        return Err(SpoolError::Damaged {
                            path,
                            offset,
                            source,
                        });
                    }
                }
                result => return result,
            }
        }
    }

    /// Counts readings that could not be stored, and tries to persist the count.
    fn count_lost(&mut self, count: u64, error: &SpoolError) {
        if count == 0 {
            return;
        }
        self.state.dropped_total += count;
        tracing::warn!(
            count,
            dropped_total = self.state.dropped_total,
            error = %error,
            "spool: readings could not be stored and were dropped"
        );
        if let Err(e) = self.state.save(&self.dir) {
            tracing::error!(error = %e, "spool: could not persist the dropped count");
        }
    }

    fn active(&self) -> &Segment {
        // `segments` is never empty: open creates one and nothing removes the last.
        &self.segments[self.segments.len() - 1]
    }

    fn active_mut(&mut self) -> &mut Segment {
        let last = self.segments.len() - 1;
        &mut self.segments[last]
    }
}

impl Drop for Spool {
    /// A spool dropped without [`task::run`]'s shutdown sync still syncs (best effort).
    fn drop(&mut self) {
        if let Err(e) = self.sync() {
            tracing::error!(error = %e, "spool: final fsync failed");
        }
    }
}

/// Takes the spool's lock file, so that two processes never append to one spool; waits up to
/// [`LOCK_WAIT`] for it.
fn lock(dir: &Path) -> Result<File, SpoolError> {
    let path = dir.join(LOCK_FILE);
    let file = File::options()
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .at("opening", &path)?;
    // The lock belongs to the open file, which a child process forked by another thread
    // shares until it execs; so a spool closed and reopened in one process can find it held for
    // a moment, and a restarting agent's predecessor may still be on its way out.
    let started = Instant::now();
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(fs::TryLockError::WouldBlock) if started.elapsed() < LOCK_WAIT => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(fs::TryLockError::WouldBlock) => {
                return Err(SpoolError::Locked(dir.to_path_buf()));
            }
            Err(fs::TryLockError::Error(e)) => {
                return Err(FileError::new("locking", &path, e).into());
            }
        }
    }
}
