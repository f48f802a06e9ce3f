//! The spool as a task: appends what the meter sources send, syncs when a sync is due and at
//! shutdown. The spool itself does blocking file I/O, so every call runs in
//! `spawn_blocking`; the sender shares the same [`SharedSpool`] for reading and acknowledging.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use drover_protocol::reading::Reading;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{MAX_RECORD_READINGS, Spool, SpoolError};

/// A spool shared between the spool task and the sender.
pub type SharedSpool = Arc<Mutex<Spool>>;

/// Locks a shared spool; a panic while it was held is an error, not a second panic.
pub fn lock(spool: &Mutex<Spool>) -> Result<MutexGuard<'_, Spool>, SpoolError> {
    spool.lock().map_err(|_| SpoolError::Poisoned)
}

/// Runs `f` on the spool in a blocking thread.
pub async fn with_spool<T, F>(spool: &SharedSpool, f: F) -> Result<T, SpoolError>
where
    F: FnOnce(&mut Spool) -> Result<T, SpoolError> + Send + 'static,
    T: Send + 'static,
{
    let spool = Arc::clone(spool);
    tokio::task::spawn_blocking(move || f(&mut *lock(&spool)?))
        .await
        .map_err(|_| SpoolError::Poisoned)?
}

/// How long the task waits before retrying a failed fsync.
const SYNC_RETRY: Duration = Duration::from_secs(1);

/// Appends every batch of readings that arrives on `readings` (one record per batch, split
/// when a batch is larger than a record may be) and syncs when a sync is due. On shutdown, or
/// when every sender is gone, appends what is already queued, syncs and returns.
///
/// A failed append or fsync is logged (the spool counts the readings it could not store as
/// dropped) and the task goes on, so that a disk that was full and frees up does not stop the
/// meters for good. Only a poisoned spool ends it early.
pub async fn run(
    spool: SharedSpool,
    mut readings: mpsc::Receiver<Vec<Reading>>,
    shutdown: CancellationToken,
) -> Result<(), SpoolError> {
    let mut sync_at: Option<Instant> = None;
    loop {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            batch = readings.recv() => match batch {
                Some(batch) => sync_at = append(&spool, batch).await?,
                None => break,
            },
            () = tokio::time::sleep_until(sync_at.unwrap_or_else(Instant::now)), if sync_at.is_some() => {
                sync_at = with_spool(&spool, |spool| Ok(sync(spool, Spool::sync_if_due))).await?;
            }
        }
    }
    readings.close();
    while let Ok(batch) = readings.try_recv() {
        append(&spool, batch).await?;
    }
    with_spool(&spool, |spool| Ok(sync(spool, Spool::sync))).await?;
    Ok(())
}

/// Appends a batch; returns when the next sync is due.
async fn append(spool: &SharedSpool, batch: Vec<Reading>) -> Result<Option<Instant>, SpoolError> {
    with_spool(spool, move |spool| {
        for chunk in batch.chunks(MAX_RECORD_READINGS) {
            if let Err(e) = spool.append(chunk) {
                tracing::error!(error = %e, "spool: append failed");
            }
        }
        Ok(spool.sync_due_in().map(|d| Instant::now() + d))
    })
    .await
}

/// Runs a sync; returns when the next one is due (after a failure: a retry a little later).
fn sync(spool: &mut Spool, f: fn(&mut Spool) -> Result<(), SpoolError>) -> Option<Instant> {
    if let Err(e) = f(spool) {
        tracing::error!(error = %e, "spool: fsync failed");
        return Some(Instant::now() + SYNC_RETRY);
    }
    spool.sync_due_in().map(|d| Instant::now() + d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SpoolConfig;
    use crate::spool::tests::readings;

    #[tokio::test]
    async fn appends_what_arrives_and_syncs_at_shutdown() {
        let dir = tempfile::tempdir().unwrap();
        let config = SpoolConfig {
            sync_interval: Duration::from_secs(60),
            sync_bytes: u64::MAX,
            ..SpoolConfig::default()
        };
        let spool: SharedSpool = Arc::new(Mutex::new(Spool::open(dir.path(), &config).unwrap()));
        let (tx, rx) = mpsc::channel(8);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run(Arc::clone(&spool), rx, shutdown.clone()));
        tx.send(readings(0, 2)).await.unwrap();
        tx.send(Vec::new()).await.unwrap();
        tx.send(readings(2, MAX_RECORD_READINGS + 1)).await.unwrap();
        // Nothing is synced yet: the interval is long and the byte threshold out of reach.
        crate::testutil::wait_until("three records", || lock(&spool).unwrap().last_id() == 3).await;
        assert_eq!(lock(&spool).unwrap().synced_id(), 0);
        shutdown.cancel();
        task.await.unwrap().unwrap();
        let mut spool = lock(&spool).unwrap();
        assert_eq!(spool.synced_id(), 3);
        let records = spool.read(1, usize::MAX).unwrap();
        let counts: Vec<usize> = records.iter().map(|r| r.readings.len()).collect();
        assert_eq!(counts, [2, MAX_RECORD_READINGS, 1]);
    }

    #[tokio::test]
    async fn syncs_on_the_interval() {
        let dir = tempfile::tempdir().unwrap();
        let config = SpoolConfig {
            sync_interval: Duration::from_millis(20),
            sync_bytes: u64::MAX,
            ..SpoolConfig::default()
        };
        let spool: SharedSpool = Arc::new(Mutex::new(Spool::open(dir.path(), &config).unwrap()));
        let (tx, rx) = mpsc::channel(8);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run(Arc::clone(&spool), rx, shutdown.clone()));
        tx.send(readings(0, 1)).await.unwrap();
        // No further append comes to trigger it: the task's timer must.
        crate::testutil::wait_until("the record synced", || {
            lock(&spool).unwrap().synced_id() == 1
        })
        .await;
        drop(tx);
        task.await.unwrap().unwrap();
    }
}
