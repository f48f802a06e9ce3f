//! The sender: readings from the spool to the hub, in batches, each stored exactly once.
//!
//! **Exactly once.** A batch is a run of spool records. Before it is first sent it gets the
//! next sequence number, and `telemetry.json` records which records it holds
//! ([`state::Inflight`]); only then does it go out. Until the hub answers `204` (stored
//! durably), the same records go again under the same number, across retries and restarts. On
//! `204` the spool's cursor moves past the records ([`Spool::ack`]) and the batch is cleared. The
//! hub drops a sequence number it has already stored, so a lost acknowledgement costs a resend,
//! never a second copy. The spool hands out only fsync'd records, so a power cut cannot take back
//! a record the hub has already stored.
//!
//! **Pace.** A batch goes out every `batch_interval` (widened by the monthly budget, see
//! [`budget`]); a backlog (after the hub was unreachable) goes back to back,
//! `max_batch_readings` at a time. Network trouble and `5xx` back off exponentially; `503` or
//! `429` with `Retry-After` (the hub's ingest queue is full) waits as asked (at least 1 s, with
//! jitter, so that devices refused together do not return together).
//!
//! **Refusals.** A checksum refused (damaged on the way) is sent again; a format the hub does
//! not know yet (an agent newer than its hub) is kept and retried every few minutes; `401`/`403`
//! wait for the main loop to enrol again or for an operator. `413` (too large), `422`
//! (timestamps the hub finds implausible), a `400` naming a frame error (`batch_*`), or a
//! batch the codec cannot encode, halves the batch under the same sequence number (the hub
//! stored none of it) until the refused part is a single spool record; that record is dropped,
//! logged as an error, counted in `refused_readings` and reported as dropped. So one bad
//! reading costs only its own record, and never blocks the readings after it. Any other `4xx`
//! (a `404` from an older hub, a proxy's answer) says nothing about the readings: they are kept
//! and sent again after a backoff.
//!
//! Every change to `telemetry.json` is written before it takes effect in memory, so a failed
//! write never leaves the sender using a number or a record range a restart would not know.
//!
//! [`Spool::ack`]: crate::spool::Spool::ack

pub mod budget;
pub mod state;
mod stream;

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use drover_protocol::batch::{self, Batch};
use drover_protocol::device::TelemetryStatus;
use drover_protocol::ids::DeviceId;
use drover_protocol::reading::Reading;
use drover_protocol::spool::Record;
use reqwest::StatusCode;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use self::budget::Usage;
use self::state::{Inflight, SenderState};
use crate::client::{HubClient, HubError};
use crate::config::TelemetryConfig;
use crate::fsutil::FileError;
use crate::outbox::now_ms;
use crate::spool::SpoolError;
use crate::spool::task::{SharedSpool, lock, with_spool};

/// The longest wait between retries after network trouble or a `5xx`.
const MAX_BACKOFF: Duration = Duration::from_secs(5 * 60);
/// The longest `Retry-After` obeyed (a hub asking for more is capped).
const MAX_RETRY_AFTER: Duration = Duration::from_secs(10 * 60);

/// Who the device is, once enrolled: what a batch is sent as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enrolled {
    /// The device ID the batches carry.
    pub device: DeviceId,
    /// The bearer credential.
    pub credential: String,
}

/// Why the sender stopped before it was asked to.
#[derive(Debug, thiserror::Error)]
pub enum SenderError {
    /// The spool failed.
    #[error(transparent)]
    Spool(#[from] SpoolError),
    /// `telemetry.json` could not be read or written.
    #[error(transparent)]
    File(#[from] FileError),
}

/// The sender's figures, shared with the check-ins that report them.
#[derive(Debug, Clone, Default)]
struct Figures {
    month: i64,
    month_bytes: u64,
    refused: u64,
    interval: Duration,
}

/// A handle on the telemetry path for the rest of the agent: its status for check-ins.
#[derive(Debug, Clone)]
pub struct Telemetry {
    spool: SharedSpool,
    figures: Arc<Mutex<Figures>>,
    budget: Option<u64>,
}

impl Telemetry {
    /// What the next check-in reports.
    pub fn status(&self) -> TelemetryStatus {
        let figures = self.figures();
        let (spooled, spool_dropped) = match lock(&self.spool) {
            Ok(spool) => (spool.pending_readings(), spool.dropped_total()),
            Err(_) => (0, 0),
        };
        let month_bytes = if figures.month == budget::month_of(now_ms()) {
            figures.month_bytes
        } else {
            0
        };
        TelemetryStatus {
            spooled,
            dropped: spool_dropped.saturating_add(figures.refused),
            month_bytes,
            budget_bytes: self.budget,
            batch_interval_s: figures.interval.as_secs().max(1),
        }
    }

    fn figures(&self) -> MutexGuard<'_, Figures> {
        self.figures.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The sender task's parts.
#[derive(Debug)]
pub struct Sender {
    spool: SharedSpool,
    client: HubClient,
    enrolled: watch::Receiver<Option<Enrolled>>,
    config: TelemetryConfig,
    path: PathBuf,
    state: SenderState,
    usage: Usage,
    figures: Arc<Mutex<Figures>>,
    /// The spool's appended count when the last batch was made, for the reading rate.
    last_count: Option<(Instant, u64)>,
    /// The sequence number of a batch made in this process and not sent yet: if the hub says
    /// it has that number already, the device's counter is behind (its state was restored from
    /// an old copy), not a resend after a lost answer.
    unsent: Option<u64>,
    errors: u32,
    /// The telemetry stream, while it is open.
    stream: Option<crate::client::BatchStream>,
    /// The highest sequence number sent on the open stream.
    stream_sent: u64,
    /// What the frames sent on the open stream said: the next one is written against it.
    stream_context: Option<drover_protocol::batch::stream::StreamContext>,
    /// When the hub last confirmed (or the stream opened).
    asked_at: Instant,
    /// Batches go as requests until then (the hub would not open a stream).
    stream_off_until: Option<Instant>,
}

/// What one round of sending came to.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// A batch was stored; `more` when a backlog waits.
    Sent { more: bool },
    /// Nothing to send.
    Empty,
    /// The batch was changed (halved, or renumbered past the hub's counter); send it again now.
    Again,
    /// The hub refused the batch for good; it was dropped and counted.
    Dropped,
    /// Try again after this long (the hub asked, or its queue is full).
    RetryAfter(Duration),
    /// Network trouble or a `5xx`: back off.
    Failed,
    /// The credential was refused: wait for the main loop.
    Unauthorized,
}

impl Sender {
    /// Prepares the sender: loads `telemetry.json` at `path`.
    pub fn new(
        spool: SharedSpool,
        client: HubClient,
        enrolled: watch::Receiver<Option<Enrolled>>,
        config: TelemetryConfig,
        path: PathBuf,
    ) -> Result<(Sender, Telemetry), SenderError> {
        let state = SenderState::load(&path)?;
        let figures = Arc::new(Mutex::new(Figures {
            month: state.month,
            month_bytes: state.month_bytes,
            refused: state.refused_readings,
            interval: config.batch_interval,
        }));
        let telemetry = Telemetry {
            spool: Arc::clone(&spool),
            figures: Arc::clone(&figures),
            budget: config.monthly_budget_bytes,
        };
        let sender = Sender {
            spool,
            client,
            enrolled,
            config,
            path,
            state,
            usage: Usage::default(),
            figures,
            last_count: None,
            unsent: None,
            errors: 0,
            stream: None,
            stream_sent: 0,
            stream_context: None,
            asked_at: Instant::now(),
            stream_off_until: None,
        };
        Ok((sender, telemetry))
    }

    /// Sends until `shutdown`. A batch cut off by the shutdown goes again, under the same
    /// sequence number, after the next start.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<(), SenderError> {
        let mut next = Instant::now();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                () = tokio::time::sleep_until(next) => {}
            }
            let Some(enrolled) = self.wait_for_enrolment(&shutdown).await else {
                return Ok(());
            };
            let outcome = tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                outcome = self.round(&enrolled) => outcome,
            };
            // A local failure (a damaged spool segment, a full disk) is retried like a network
            // one: telemetry must not stop for good while the agent runs.
            let outcome = outcome.unwrap_or_else(|e| {
                tracing::error!(error = %e, "telemetry: sending failed on the device");
                Outcome::Failed
            });
            let now = Instant::now();
            next = match outcome {
                Outcome::Sent { more: true } | Outcome::Again | Outcome::Dropped => now,
                Outcome::Sent { more: false } | Outcome::Empty => now + self.interval(),
                Outcome::RetryAfter(wait) => now + wait.min(MAX_RETRY_AFTER),
                Outcome::Failed => now + self.backoff(),
                Outcome::Unauthorized => {
                    // The main loop enrols again on a refused credential; a new one is worth
                    // trying at once, and the old one again only after a while.
                    let wait = self.backoff();
                    tokio::select! {
                        () = shutdown.cancelled() => return Ok(()),
                        changed = self.enrolled.changed() => if changed.is_err() {
                            // The agent is gone: nobody will enrol again.
                            return Ok(());
                        },
                        () = tokio::time::sleep(wait) => {}
                    }
                    Instant::now()
                }
            };
            if matches!(
                outcome,
                Outcome::Sent { .. } | Outcome::Empty | Outcome::Dropped
            ) {
                self.errors = 0;
            }
        }
    }

    async fn wait_for_enrolment(&mut self, shutdown: &CancellationToken) -> Option<Enrolled> {
        loop {
            if let Some(enrolled) = self.enrolled.borrow_and_update().clone() {
                return Some(enrolled);
            }
            tokio::select! {
                () = shutdown.cancelled() => return None,
                changed = self.enrolled.changed() => if changed.is_err() {
                    return None;
                },
            }
        }
    }

    /// The batch interval now: the configured one, widened by the budget.
    fn interval(&self) -> Duration {
        let month = budget::month_of(now_ms());
        let used = self.state.bytes_in(month);
        let interval = budget::interval(&self.config, used, now_ms(), self.usage);
        let mut figures = self.figures.lock().unwrap_or_else(|e| e.into_inner());
        if interval != figures.interval {
            tracing::info!(
                interval = ?interval,
                used,
                budget = ?self.config.monthly_budget_bytes,
                "telemetry: batch interval set to stay inside the monthly budget"
            );
        }
        figures.interval = interval;
        interval
    }

    fn backoff(&mut self) -> Duration {
        self.errors = self.errors.saturating_add(1);
        let exp = self.errors.saturating_sub(1).min(16);
        Duration::from_secs(1u64 << exp).min(MAX_BACKOFF)
    }

    /// Makes (or takes up again) one batch and sends it.
    async fn round(&mut self, enrolled: &Enrolled) -> Result<Outcome, SenderError> {
        if self.config.stream
            && let Some(outcome) = self.stream_round(enrolled).await?
        {
            return Ok(outcome);
        }
        let Some((inflight, records)) = self.next_batch().await? else {
            return Ok(Outcome::Empty);
        };
        let readings: Vec<Reading> = records
            .iter()
            .flat_map(|r| r.readings.iter().cloned())
            .collect();
        let count = readings.len() as u64;
        let frame = batch::encode(&Batch {
            device: enrolled.device.clone(),
            seq: inflight.seq,
            readings,
        });
        let frame = match frame {
            Ok(frame) => frame,
            Err(e) => {
                tracing::warn!(error = %e, seq = inflight.seq, "telemetry: batch too large to encode; halving it");
                return self.shrink(inflight, &records, count, &e.to_string()).await;
            }
        };
        let body_bytes = frame.len() as u64;
        let first_send = self.unsent.take() == Some(inflight.seq);
        let result = self.client.batch(&enrolled.credential, frame).await;
        if result
            .as_ref()
            .map_or_else(|e| e.status().is_some(), |_| true)
        {
            // It went over the link (answered or not): it counts against the budget.
            self.count_bytes(body_bytes, budget::REQUEST_OVERHEAD_BYTES);
        }
        match result {
            Ok(Some(last_seq)) if first_send && last_seq >= inflight.seq => {
                // Nothing of this batch was stored: the number was used before by a state
                // this device no longer has. Number it past the hub's and send it again.
                tracing::warn!(
                    seq = inflight.seq,
                    hub_seq = last_seq,
                    "telemetry: the batch counter was behind the hub's (state restored from an old copy?); renumbering"
                );
                let seq = last_seq.saturating_add(1);
                self.change(|s| {
                    s.inflight = Some(Inflight { seq, ..inflight });
                    s.next_seq = seq.saturating_add(1);
                })?;
                self.unsent = Some(seq);
                Ok(Outcome::Again)
            }
            Ok(_) => {
                let through = records.last().map_or(inflight.last_id, |r| r.id);
                self.acknowledged(inflight, through, count, body_bytes)
                    .await?;
                // A backlog goes at once; a partial batch waits for the interval.
                let backlog = self.backlog().await?;
                Ok(Outcome::Sent { more: backlog })
            }
            Err(e) => self.refused(e, inflight, &records, count).await,
        }
    }

    /// Whether a full batch waits already (after an outage), so it should go at once.
    async fn backlog(&self) -> Result<bool, SenderError> {
        let max = self.config.max_batch_readings as u64;
        Ok(with_spool(&self.spool, move |s| Ok(s.pending_readings() >= max)).await?)
    }

    /// The batch in flight with its records, or a new batch from the spool's oldest records.
    async fn next_batch(&mut self) -> Result<Option<(Inflight, Vec<Record>)>, SenderError> {
        if let Some(inflight) = self.state.inflight {
            let max = usize::try_from(inflight.readings)
                .unwrap_or(usize::MAX)
                .max(1);
            let mut records =
                with_spool(&self.spool, move |s| s.read(inflight.first_id, max)).await?;
            records.retain(|r| r.id <= inflight.last_id);
            if !records.is_empty() {
                return Ok(Some((inflight, records)));
            }
            // The spool dropped its records (it was full); they are counted there.
            tracing::warn!(
                seq = inflight.seq,
                "telemetry: the batch in flight was dropped by the full spool"
            );
            self.change(SenderState::pop)?;
        }
        self.new_batch(0).await
    }

    /// A new batch of the spool's records from id `after` on (0: the oldest), numbered and
    /// written to `telemetry.json` before it is first sent; `None` when there are none.
    async fn new_batch(
        &mut self,
        after: u64,
    ) -> Result<Option<(Inflight, Vec<Record>)>, SenderError> {
        let max = self.config.max_batch_readings;
        let records = with_spool(&self.spool, move |s| s.read(after, max)).await?;
        let (Some(first), Some(last)) = (records.first(), records.last()) else {
            return Ok(None);
        };
        let batch = Inflight {
            seq: self.state.next_seq,
            first_id: first.id,
            last_id: last.id,
            readings: records.iter().map(|r| r.readings.len() as u64).sum(),
        };
        // Durable before it is sent: the number and the records stay together from here on.
        self.change(|s| {
            s.next_seq += 1;
            s.push(batch);
        })?;
        self.unsent = Some(batch.seq);
        let appended = with_spool(&self.spool, |s| Ok(s.appended_total())).await?;
        self.observe_rate(appended);
        Ok(Some((batch, records)))
    }

    fn observe_rate(&mut self, appended: u64) {
        let now = Instant::now();
        if let Some((then, count)) = self.last_count {
            let seconds = now.duration_since(then).as_secs_f64();
            if seconds >= 1.0 && appended >= count {
                self.usage
                    .observe(Some((appended - count) as f64 / seconds), None);
            }
        }
        self.last_count = Some((now, appended));
    }

    /// The hub stored the batch: move the spool past it and count the bytes.
    /// `through` is the last record the batch really carried (the spool may have handed out
    /// fewer records than the batch was made with, never others).
    async fn acknowledged(
        &mut self,
        inflight: Inflight,
        through: u64,
        readings: u64,
        body_bytes: u64,
    ) -> Result<(), SenderError> {
        with_spool(&self.spool, move |s| s.ack(through)).await?;
        self.change(SenderState::pop)?;
        if readings > 0 {
            self.usage
                .observe(None, Some(body_bytes as f64 / readings as f64));
        }
        tracing::debug!(
            seq = inflight.seq,
            readings,
            bytes = body_bytes,
            "telemetry: batch stored"
        );
        Ok(())
    }

    async fn refused(
        &mut self,
        e: HubError,
        inflight: Inflight,
        records: &[Record],
        readings: u64,
    ) -> Result<Outcome, SenderError> {
        if let (Some(wait), Some(StatusCode::SERVICE_UNAVAILABLE | StatusCode::TOO_MANY_REQUESTS)) =
            (e.retry_after(), e.status())
        {
            // Jittered, so that devices refused together do not all come back together.
            let wait = crate::schedule::jittered(wait, Duration::from_secs(1));
            tracing::info!(error = %e, retry_in = ?wait, seq = inflight.seq, "telemetry: the hub is busy");
            return Ok(Outcome::RetryAfter(wait));
        }
        if e.is_transient() {
            tracing::warn!(error = %e, seq = inflight.seq, "telemetry: batch not delivered; retrying");
            return Ok(Outcome::Failed);
        }
        match e.code() {
            // Damaged on the way: it is still in the spool; send it again.
            Some("batch_checksum") => return Ok(Outcome::Failed),
            // The agent speaks a newer format than the hub: keep the data for an upgraded hub.
            Some("batch_version" | "batch_channel" | "batch_clock_state") => {
                tracing::error!(error = %e, "telemetry: the hub does not understand this agent's batches; keeping them until it does");
                return Ok(Outcome::RetryAfter(MAX_BACKOFF));
            }
            _ => {}
        }
        match e.status() {
            Some(StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) => {
                tracing::warn!(error = %e, "telemetry: the hub refused the device's credential");
                Ok(Outcome::Unauthorized)
            }
            // Too large, or something in it the hub refuses for good (a reading it finds
            // implausible, a frame it cannot read): halve the batch until the refused part is a
            // single record, so that only its readings are lost.
            Some(StatusCode::PAYLOAD_TOO_LARGE) => {
                self.shrink(inflight, records, readings, &e.to_string())
                    .await
            }
            Some(_)
                if e.code() == Some("implausible_batch")
                    || e.code().is_some_and(|c| c.starts_with("batch_")) =>
            {
                self.shrink(inflight, records, readings, &e.to_string())
                    .await
            }
            // Anything else (a 404 from an older hub, a proxy's 400 or 421, a 415) says nothing
            // about the readings: keep them and try again later.
            _ => {
                tracing::warn!(error = %e, seq = inflight.seq, "telemetry: batch not delivered; retrying later");
                Ok(Outcome::Failed)
            }
        }
    }

    /// Keeps the first half of the batch's records under the same sequence number (the hub
    /// stored none of the refused batch); a single record that is still refused is dropped.
    async fn shrink(
        &mut self,
        inflight: Inflight,
        records: &[Record],
        readings: u64,
        why: &str,
    ) -> Result<Outcome, SenderError> {
        if records.len() < 2 {
            let through = records.last().map_or(inflight.last_id, |r| r.id);
            self.drop_batch(inflight, through, readings, why).await?;
            return Ok(Outcome::Dropped);
        }
        tracing::warn!(
            seq = inflight.seq,
            records = records.len(),
            why,
            "telemetry: the hub refused a batch; sending its halves apart"
        );
        let keep = &records[..records.len() / 2];
        let last_id = keep.last().map_or(inflight.first_id, |r| r.id);
        let readings = keep.iter().map(|r| r.readings.len() as u64).sum();
        // The batches after it were not stored either (the hub stores a device's batches in
        // order); their records go out again in new batches after this one.
        self.change(|s| {
            s.inflight = Some(Inflight {
                last_id,
                readings,
                ..inflight
            });
            s.later.clear();
        })?;
        Ok(Outcome::Again)
    }

    /// Drops the batch's records (through `through`), counting them first: a crash in between
    /// may count them twice, never zero times.
    async fn drop_batch(
        &mut self,
        inflight: Inflight,
        through: u64,
        readings: u64,
        why: &str,
    ) -> Result<(), SenderError> {
        tracing::error!(
            seq = inflight.seq,
            readings,
            why,
            "telemetry: the hub refused a batch for good; its readings are dropped and counted"
        );
        self.change(|s| {
            s.refused_readings = s.refused_readings.saturating_add(readings);
            s.inflight = None;
            s.later.clear();
        })?;
        with_spool(&self.spool, move |s| s.ack(through)).await?;
        self.figures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .refused = self.state.refused_readings;
        Ok(())
    }

    /// Counts a request's bytes against the month (saved with the next state change).
    fn count_bytes(&mut self, body_bytes: u64, overhead: u64) {
        let month = budget::month_of(now_ms());
        self.state.count_bytes(month, body_bytes + overhead);
        let mut figures = self.figures.lock().unwrap_or_else(|e| e.into_inner());
        figures.month = self.state.month;
        figures.month_bytes = self.state.month_bytes;
    }

    /// Makes `change` to a copy of the state, writes the copy, and only then keeps it: if the
    /// write fails, the state in memory stays what is on disk, so nothing is ever sent under a
    /// number (or a record range) that a restart would not know.
    fn change(&mut self, change: impl FnOnce(&mut SenderState)) -> Result<(), FileError> {
        let mut next = self.state.clone();
        change(&mut next);
        next.save(&self.path)?;
        self.state = next;
        Ok(())
    }
}
