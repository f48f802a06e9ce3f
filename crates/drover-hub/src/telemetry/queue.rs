//! The ingest queue between the bridge and the writer.
//!
//! The bridge checks a batch and [`IngestQueue::submit`]s it; the answer comes only once the
//! batch is durable in the store, so an acknowledged batch is never lost (and an unacknowledged
//! one is still in the device's spool, which sends it again). The local implementation is a
//! bounded channel feeding one writer task that *lands* many batches in one transaction (group
//! commit: one fsync for all of them; see [`crate::store::ingest`]) and then acknowledges them;
//! the [`Folder`] folds landed batches into chunks and rollups later, in larger groups. When the
//! channel is full, or more has landed than the folder keeps up with, the bridge answers `503`
//! with `Retry-After`: a load peak then waits in the devices' spools instead of in the hub.
//!
//! With several hub replicas the same trait is implemented over NATS JetStream: `submit`
//! publishes and resolves on JetStream's acknowledgement (the stream is then the landing
//! place), and folders consume the stream.

use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::fold::{IngestJob, IngestOutcome};
use super::folder::Folder;
use crate::store::{Lander, Store};

/// How long a device is asked to wait when the queue is full.
pub const RETRY_AFTER: Duration = Duration::from_secs(2);

/// Why a batch was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The queue is full; try again after the given time.
    #[error("the hub is busy; try again in {}s", retry_after.as_secs())]
    Full {
        /// How long to wait.
        retry_after: Duration,
    },
    /// The hub is shutting down.
    #[error("the hub is shutting down")]
    Closed,
    /// The store failed; the batch was not stored.
    #[error("storing the batch failed: {0}")]
    Store(String),
}

/// Where checked batches go to become durable.
#[async_trait]
pub trait IngestQueue: Send + Sync + std::fmt::Debug {
    /// Queues a batch and resolves once it is durable (or found to be a duplicate).
    async fn submit(&self, job: IngestJob) -> Result<IngestOutcome, QueueError>;
}

type Entry = (IngestJob, oneshot::Sender<Result<IngestOutcome, String>>);

/// The in-process queue: a bounded channel and one group-committing writer.
#[derive(Debug, Clone)]
pub struct LocalQueue {
    tx: mpsc::Sender<Entry>,
    folder: Folder,
}

/// Settings of the local queue.
#[derive(Debug, Clone, Copy)]
pub struct QueueConfig {
    /// Batches that may wait (beyond those being written).
    pub capacity: usize,
    /// Most batches folded in one transaction.
    pub max_group: usize,
}

impl LocalQueue {
    /// Starts the writer; it stops after `shutdown`, once the batches already queued are
    /// landed. It tells `folder` what it landed.
    pub fn start(
        store: Store,
        config: QueueConfig,
        folder: Folder,
        shutdown: CancellationToken,
    ) -> (LocalQueue, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(config.capacity.max(1));
        let writer = tokio::spawn(write_loop(
            store,
            rx,
            config.max_group.max(1),
            folder.clone(),
            shutdown,
        ));
        (LocalQueue { tx, folder }, writer)
    }
}

#[async_trait]
impl IngestQueue for LocalQueue {
    async fn submit(&self, job: IngestJob) -> Result<IngestOutcome, QueueError> {
        if self.folder.is_full() {
            return Err(QueueError::Full {
                retry_after: RETRY_AFTER,
            });
        }
        let (done, receipt) = oneshot::channel();
        self.tx.try_send((job, done)).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => QueueError::Full {
                retry_after: RETRY_AFTER,
            },
            mpsc::error::TrySendError::Closed(_) => QueueError::Closed,
        })?;
        match receipt.await {
            Ok(Ok(outcome)) => Ok(outcome),
            Ok(Err(e)) => Err(QueueError::Store(e)),
            Err(_) => Err(QueueError::Closed),
        }
    }
}

async fn write_loop(
    store: Store,
    mut rx: mpsc::Receiver<Entry>,
    max_group: usize,
    folder: Folder,
    shutdown: CancellationToken,
) {
    let mut lander = Lander::new(store);
    loop {
        let first = tokio::select! {
            entry = rx.recv() => entry,
            () = shutdown.cancelled() => {
                // Refuse new batches, then write what is already queued.
                rx.close();
                rx.recv().await
            }
        };
        let Some(first) = first else { break };
        let mut group = vec![first];
        while group.len() < max_group {
            match rx.try_recv() {
                Ok(entry) => group.push(entry),
                Err(_) => break,
            }
        }
        let (jobs, replies): (Vec<IngestJob>, Vec<_>) = group.into_iter().unzip();
        let landed = {
            let _turn = folder.landing_turn().await;
            lander.land(&jobs).await
        };
        match landed {
            Ok(outcomes) => {
                folder.landed(outcomes.iter().map(|(_, rows)| rows).sum());
                for (reply, (outcome, _)) in replies.into_iter().zip(outcomes) {
                    let _ = reply.send(Ok(outcome));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, batches = jobs.len(), "landing batches failed");
                for reply in replies {
                    let _ = reply.send(Err(e.to_string()));
                }
            }
        }
    }
}
