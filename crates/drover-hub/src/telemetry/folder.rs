//! The folder: writes landed batches into series, chunks and rollups, in the background.
//!
//! The ingest writer acknowledges a batch once it has *landed* (one row of `landed_batches`,
//! see [`crate::store::ingest`]); the folder folds what has landed in large groups,
//! `ingest_fold_delay_ms` after the first of them landed, up to `ingest_fold_batches` rows per
//! transaction, and at once again while whole groups wait (it is behind). Folding many batches
//! of a series at once is what keeps small batches cheap. Readers never
//! see the difference: a query or report first calls [`Folder::settle`], which folds whatever
//! landed before it asked, and the live stream gets each point when it is folded (within the
//! delay of landing).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{Mutex, Notify, broadcast};
use tokio_util::sync::CancellationToken;

use super::fold::LivePoint;
use crate::store::{Engine, Store, StoreResult};

/// How long the folder waits after a failed fold before it tries again.
const RETRY_PAUSE: Duration = Duration::from_secs(1);

/// Landed batches (rows) that may wait to be folded, in multiples of a fold's size; beyond,
/// the ingest queue answers "busy" so that a folder that cannot keep up slows devices down
/// instead of letting the landing table grow without end.
const BACKLOG_FOLDS: usize = 16;

/// A handle on the folder, shared by the ingest writer (which reports what it landed), the
/// folding task and readers (which settle before they read).
#[derive(Debug, Clone)]
pub struct Folder {
    store: Store,
    live: broadcast::Sender<LivePoint>,
    shared: Arc<Shared>,
    max_rows: usize,
}

#[derive(Debug, Default)]
struct Shared {
    /// Rows landed and not yet known to be folded (an estimate: another replica may fold them).
    backlog: AtomicUsize,
    /// Wakes the folding task when rows land.
    wake: Notify,
    /// Serializes this hub's writing transactions on SQLite (landing and folding), so that they
    /// queue here instead of polling SQLite's busy handler; on PostgreSQL only folds.
    write: Mutex<()>,
}

impl Folder {
    /// A folder over `store` that folds at most `max_rows` landed rows per transaction and
    /// sends folded points to `live`. Counts the rows already waiting (left by a hub that
    /// stopped before folding them).
    pub async fn new(
        store: Store,
        live: broadcast::Sender<LivePoint>,
        max_rows: usize,
    ) -> StoreResult<Folder> {
        let waiting = store.landed_rows().await?;
        let shared = Shared {
            backlog: AtomicUsize::new(waiting),
            ..Shared::default()
        };
        Ok(Folder {
            store,
            live,
            shared: Arc::new(shared),
            max_rows: max_rows.max(1),
        })
    }

    /// Reports `rows` newly landed rows.
    pub fn landed(&self, rows: usize) {
        if rows > 0 {
            self.shared.backlog.fetch_add(rows, Ordering::Relaxed);
            self.shared.wake.notify_one();
        }
    }

    /// Landed rows waiting to be folded (an estimate).
    pub fn backlog(&self) -> usize {
        self.shared.backlog.load(Ordering::Relaxed)
    }

    /// Whether so much waits to be folded that new batches should be turned away for now.
    pub fn is_full(&self) -> bool {
        self.backlog() >= self.max_rows.saturating_mul(BACKLOG_FOLDS)
    }

    /// Holds this hub's write turn for a landing transaction (on SQLite; `None` on PostgreSQL,
    /// where landing and folding may overlap).
    pub async fn landing_turn(&self) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        match self.store.engine() {
            Engine::Sqlite => Some(self.shared.write.lock().await),
            Engine::Postgres => None,
        }
    }

    /// Folds one group of landed rows (those up to `upto` when given) and sends its points to
    /// the live stream. Returns the rows folded (0: nothing was waiting).
    async fn fold_once(&self, upto: Option<i64>) -> StoreResult<usize> {
        let seen = self.backlog();
        let folded = {
            let _turn = self.shared.write.lock().await;
            self.store.fold_landed(upto, self.max_rows).await?
        };
        for point in folded.live {
            // Nobody listening is fine.
            let _ = self.live.send(point);
        }
        // Nothing waited: what was counted before the fold was folded elsewhere (by a reader,
        // or by another replica).
        let done = if folded.rows == 0 { seen } else { folded.rows };
        let _ = self
            .shared
            .backlog
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_sub(done))
            });
        Ok(folded.rows)
    }

    /// Folds every batch that landed before this call, so that a read that follows sees it.
    /// Cheap when nothing waits (one indexed lookup).
    pub async fn settle(&self) -> StoreResult<()> {
        let Some(upto) = self.store.newest_landed().await? else {
            return Ok(());
        };
        while self.fold_once(Some(upto)).await? > 0 {}
        Ok(())
    }
}

/// Folds landed batches until `shutdown`, then folds what waits once more and stops.
pub async fn run(folder: Folder, delay: Duration, shutdown: CancellationToken) {
    loop {
        // Wait for something to fold.
        while folder.backlog() == 0 {
            tokio::select! {
                () = folder.shared.wake.notified() => {}
                () = shutdown.cancelled() => return,
            }
        }
        // Let more land, for the delay.
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = shutdown.cancelled() => {}
        }
        // Fold; while whole groups come back the folder is behind, and goes on at once.
        loop {
            match folder.fold_once(None).await {
                Ok(rows) if rows < folder.max_rows => break,
                Ok(_) => {}
                Err(e) => {
                    tracing::error!(error = %e, "folding landed batches failed; they stay landed and are tried again");
                    tokio::select! {
                        () = tokio::time::sleep(RETRY_PAUSE) => {}
                        () = shutdown.cancelled() => return,
                    }
                    break;
                }
            }
        }
        if shutdown.is_cancelled() {
            // What the writer lands after this is folded when the hub starts again.
            return;
        }
    }
}
