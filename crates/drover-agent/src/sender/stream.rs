//! The sender on the telemetry stream (`POST /device/v1/batches/stream`, see
//! [`drover_protocol::batch::stream`]): batches go on one long-lived request, and the hub is
//! asked to confirm what it stored only every `ack_interval`, for all of them at once.
//!
//! **The window.** Batches sent and not yet confirmed are `inflight` and `later` in
//! `telemetry.json`: increasing sequence numbers over consecutive spool records, each written
//! before it is first sent. The rules of the request-per-batch path hold for every one of them:
//! until the hub confirms it, a batch goes again (on a new stream, after a restart, or as a
//! request) under the same number with the same records.
//!
//! **Order.** The hub reads the stream one message at a time and stores each batch before it
//! reads the next, so a device's batches are stored in order. A confirmation `stored: S` thus
//! covers every batch up to `S`. A refusal ends the stream and is preceded by what was stored:
//! the refused batch is the oldest one left, and the batches after it were not stored, so they
//! are forgotten and their records go out again, in new batches, after the refused one is dealt
//! with as on the request path (halved, dropped and counted, or retried).
//!
//! **Opening.** The answer to the stream's request carries `Drover-Last-Seq`. Batches of the
//! window up to it that were sent before are stored (their confirmation was lost); a batch made
//! in this process and never sent that is not past it means the device's counter went back (its
//! state was restored from an old copy): it is renumbered past the hub's, as on the request path.

use std::time::Duration;

use drover_protocol::batch::stream::{Reply, StreamContext, encode_message};
use drover_protocol::batch::{self, Batch, BatchError};
use drover_protocol::spool::Record;
use reqwest::StatusCode;
use tokio::time::Instant;

use super::state::Inflight;
use super::{Enrolled, Outcome, Sender, SenderError};
use crate::client::{CALL_TIMEOUT, HubError};
use crate::spool::task::with_spool;

/// How long batches go as requests after the hub would not open a stream (a hub older than the
/// stream, or a proxy that refuses it) before the stream is tried again.
const STREAM_RETRY: Duration = Duration::from_secs(60 * 60);

/// The most batches sent without a confirmation; at this many the sender asks for one and
/// waits for it before making another batch.
const MAX_WINDOW: usize = 64;

/// How long a sender that found the stream gone waits for the rest of the hub's answer.
const LAST_WORDS: Duration = Duration::from_secs(5);

/// What a message on the stream costs besides its frame, both ways, on a kept-alive HTTP/2
/// connection over TLS: the varint (2), the HTTP/2 DATA frame (9), a TLS record (22), the TCP/IP
/// headers of its segment and of the hub's ACK (52 each). Confirmations cost about 150 more each.
pub const STREAM_OVERHEAD_BYTES: u64 = 137;

impl Sender {
    /// One round on the stream: batches of the window not yet on this stream, then a new batch,
    /// and, every `ack_interval`, a wait for the hub's confirmation. `None` when batches must go
    /// as requests this time (the hub has no stream, or a batch cannot be encoded: the request
    /// path halves it).
    pub(super) async fn stream_round(
        &mut self,
        enrolled: &Enrolled,
    ) -> Result<Option<Outcome>, SenderError> {
        if self.stream_off_until.is_some_and(|t| Instant::now() < t) {
            return Ok(None);
        }
        if self.stream.is_none() {
            match self.client.open_stream(&enrolled.credential).await {
                Ok(stream) => {
                    let last = stream.last_seq;
                    self.stream = Some(stream);
                    self.stream_sent = 0;
                    self.stream_context = Some(StreamContext::new(enrolled.device.clone(), last));
                    self.asked_at = Instant::now();
                    self.reconcile(last).await?;
                }
                Err(e) => return Ok(self.open_refused(e)),
            }
        }
        // A refusal may have come unasked.
        loop {
            let reply = match self.stream.as_mut().map(|s| s.try_reply()) {
                Some(Ok(Some(reply))) => reply,
                Some(Ok(None)) => break,
                _ => return Ok(Some(self.stream_broke("the hub ended the stream"))),
            };
            if let Some(outcome) = self.on_reply(reply, None).await? {
                return Ok(Some(outcome));
            }
        }
        // Batches of the window not on this stream yet go first, in order.
        let pending: Vec<Inflight> = self
            .state
            .window()
            .filter(|b| b.seq > self.stream_sent)
            .copied()
            .collect();
        for b in pending {
            let records = self.records_of(b).await?;
            let Ok(frame) = self.encode(enrolled, b.seq, &records) else {
                return Ok(None);
            };
            if !self.send(&frame, false).await {
                return self.send_failed().await;
            }
            self.stream_sent = b.seq;
        }
        let new = self.next_stream_batch().await?;
        let window = self.state.window_len();
        // Ask when enough batches wait, when they have waited long enough, or when nothing new
        // came (the meters went quiet: no reason to keep them waiting).
        let ask = window >= self.ack_every()
            || window >= MAX_WINDOW
            || (window > 0
                && (new.is_none() || self.asked_at.elapsed() >= self.config.ack_interval));
        let mut sent = false;
        if let Some((b, records)) = new {
            let frame = match self.encode(enrolled, b.seq, &records) {
                Ok(frame) => frame,
                Err(e) => {
                    tracing::warn!(error = %e, seq = b.seq, "telemetry: batch too large to encode; sending it as a request to halve it");
                    return Ok(None);
                }
            };
            if !self.send(&frame, ask).await {
                return self.send_failed().await;
            }
            self.unsent = None;
            self.stream_sent = b.seq;
            let readings: usize = records.iter().map(|r| r.readings.len()).sum();
            if readings > 0 {
                self.usage
                    .observe(None, Some(frame.len() as f64 / readings as f64));
            }
            sent = true;
        } else if ask && !self.send(&[], true).await {
            return self.send_failed().await;
        }
        if !ask {
            return Ok(Some(if sent {
                Outcome::Sent {
                    more: self.stream_backlog().await?,
                }
            } else {
                Outcome::Empty
            }));
        }
        let through = self.state.window().last().map_or(0, |b| b.seq);
        let deadline = Instant::now() + CALL_TIMEOUT;
        loop {
            let Some(stream) = self.stream.as_mut() else {
                return Ok(Some(Outcome::Failed));
            };
            let reply = match tokio::time::timeout_at(deadline, stream.reply()).await {
                Ok(Some(reply)) => reply,
                Ok(None) => return Ok(Some(self.stream_broke("the hub ended the stream"))),
                Err(_) => return Ok(Some(self.stream_broke("no confirmation in time"))),
            };
            if let Some(outcome) = self.on_reply(reply, Some(through)).await? {
                return Ok(Some(outcome));
            }
        }
    }

    /// How many batches go between confirmations: `ack_interval` over the batch interval.
    fn ack_every(&self) -> usize {
        let interval = self.interval().as_secs_f64().max(0.001);
        let every = (self.config.ack_interval.as_secs_f64() / interval).round();
        (every as usize).clamp(1, MAX_WINDOW)
    }

    /// What a reply means for the window. `through` is the batch whose confirmation is awaited;
    /// the outcome of the round once it is settled.
    async fn on_reply(
        &mut self,
        reply: Reply,
        through: Option<u64>,
    ) -> Result<Option<Outcome>, SenderError> {
        match reply {
            Reply::Stored { stored } => {
                self.confirm(stored).await?;
                self.asked_at = Instant::now();
                match through {
                    Some(t) if stored >= t => Ok(Some(Outcome::Sent {
                        more: self.stream_backlog().await?,
                    })),
                    // Not settled yet: a refusal follows.
                    _ => Ok(None),
                }
            }
            Reply::Refused {
                refused,
                status,
                error,
                message,
                retry_after_s,
            } => {
                self.stream = None;
                let e = HubError::Refused {
                    what: "telemetry batch",
                    status: StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST),
                    code: error,
                    message,
                    retry_after: retry_after_s.map(Duration::from_secs),
                };
                // The batches after the refused one were not stored: their records go out
                // again after it, in new batches.
                if !self.state.later.is_empty() {
                    self.change(|s| s.later.clear())?;
                }
                let Some(inflight) = self.state.inflight else {
                    tracing::warn!(error = %e, "telemetry: the hub ended the stream");
                    return Ok(Some(Outcome::Failed));
                };
                if refused != 0 && refused != inflight.seq {
                    tracing::warn!(
                        refused,
                        oldest = inflight.seq,
                        "telemetry: the hub refused a batch that is not the oldest one left"
                    );
                }
                let records = self.records_of(inflight).await?;
                let readings = records.iter().map(|r| r.readings.len() as u64).sum();
                self.refused(e, inflight, &records, readings)
                    .await
                    .map(Some)
            }
        }
    }

    /// The hub stored every batch up to `stored`: moves the spool past them and forgets them.
    async fn confirm(&mut self, stored: u64) -> Result<(), SenderError> {
        let done: Vec<Inflight> = self
            .state
            .window()
            .take_while(|b| b.seq <= stored)
            .copied()
            .collect();
        let Some(last) = done.last().copied() else {
            return Ok(());
        };
        with_spool(&self.spool, move |s| s.ack(last.last_id)).await?;
        self.change(|s| {
            for _ in 0..done.len() {
                s.pop();
            }
        })?;
        tracing::debug!(
            through = last.seq,
            batches = done.len(),
            "telemetry: batches stored"
        );
        Ok(())
    }

    /// Squares the window with the hub's highest stored sequence number, given when the stream
    /// opened (see the module docs).
    async fn reconcile(&mut self, last: u64) -> Result<(), SenderError> {
        let sent_before = self
            .state
            .window()
            .filter(|b| b.seq <= last && Some(b.seq) != self.unsent)
            .count();
        if sent_before > 0 {
            let through = self
                .state
                .window()
                .nth(sent_before - 1)
                .map_or(0, |b| b.seq);
            self.confirm(through).await?;
        }
        match self.unsent {
            Some(unsent) if unsent <= last => {
                tracing::warn!(
                    seq = unsent,
                    hub_seq = last,
                    "telemetry: the batch counter was behind the hub's (state restored from an old copy?); renumbering"
                );
                let seq = last.saturating_add(1);
                self.change(|s| {
                    if let Some(b) = s.later.last_mut().or(s.inflight.as_mut()) {
                        b.seq = seq;
                    }
                    s.next_seq = seq.saturating_add(1);
                })?;
                self.unsent = Some(seq);
            }
            _ if self.state.next_seq <= last => {
                // Batches made from here on must be new to the hub.
                self.change(|s| s.next_seq = last.saturating_add(1))?;
            }
            _ => {}
        }
        Ok(())
    }

    /// A new batch of the readings after the window, written to `telemetry.json` before it is
    /// sent; `None` when there are none (or the window is full).
    async fn next_stream_batch(&mut self) -> Result<Option<(Inflight, Vec<Record>)>, SenderError> {
        if self.state.window_len() >= MAX_WINDOW {
            return Ok(None);
        }
        let after = self.state.window().last().map_or(0, |b| b.last_id + 1);
        self.new_batch(after).await
    }

    /// The spool records of a batch of the window (fewer, or none, when a full spool dropped
    /// some: what is left goes under the same number).
    async fn records_of(&self, b: Inflight) -> Result<Vec<Record>, SenderError> {
        let max = usize::try_from(b.readings).unwrap_or(usize::MAX).max(1);
        let mut records = with_spool(&self.spool, move |s| s.read(b.first_id, max)).await?;
        records.retain(|r| r.id <= b.last_id);
        Ok(records)
    }

    /// Whether a full batch waits beyond the window already, so the next should go at once.
    async fn stream_backlog(&self) -> Result<bool, SenderError> {
        let max = self.config.max_batch_readings as u64;
        let in_window: u64 = self.state.window().map(|b| b.readings).sum();
        Ok(with_spool(&self.spool, move |s| {
            Ok(s.pending_readings().saturating_sub(in_window) >= max)
        })
        .await?)
    }

    /// Sends one message; `false` when the stream is gone.
    async fn send(&mut self, frame: &[u8], ask: bool) -> bool {
        let Some(stream) = self.stream.as_ref() else {
            return false;
        };
        let mut message = Vec::with_capacity(frame.len() + 4);
        encode_message(frame, ask, &mut message);
        let ok = stream.send(message).await;
        if ok {
            self.count_bytes(frame.len() as u64, STREAM_OVERHEAD_BYTES);
        }
        ok
    }

    /// A send found the stream gone. The hub ends its side right after a refusal, which may
    /// have raced the send: what it said last settles the round, as if it had been read first.
    async fn send_failed(&mut self) -> Result<Option<Outcome>, SenderError> {
        let replies = match self.stream.as_mut() {
            Some(stream) => stream.last_words(LAST_WORDS).await,
            None => Vec::new(),
        };
        for reply in replies {
            if let Some(outcome) = self.on_reply(reply, None).await? {
                return Ok(Some(outcome));
            }
        }
        Ok(Some(self.stream_broke("the stream broke")))
    }

    fn stream_broke(&mut self, why: &str) -> Outcome {
        self.stream = None;
        tracing::warn!(
            why,
            "telemetry: the stream to the hub broke; its unconfirmed batches go again"
        );
        Outcome::Failed
    }

    /// The hub would not open the stream: what to do this round (`None`: send a request).
    fn open_refused(&mut self, e: HubError) -> Option<Outcome> {
        if let (Some(wait), Some(StatusCode::SERVICE_UNAVAILABLE | StatusCode::TOO_MANY_REQUESTS)) =
            (e.retry_after(), e.status())
        {
            let wait = crate::schedule::jittered(wait, Duration::from_secs(1));
            return Some(Outcome::RetryAfter(wait));
        }
        if e.is_transient() {
            tracing::warn!(error = %e, "telemetry: cannot open the stream to the hub; retrying");
            return Some(Outcome::Failed);
        }
        match e.status() {
            Some(StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) => {
                tracing::warn!(error = %e, "telemetry: the hub refused the device's credential");
                Some(Outcome::Unauthorized)
            }
            _ => {
                // An older hub (404) or a proxy that will not pass the stream.
                tracing::info!(error = %e, "telemetry: no stream to the hub; sending a request per batch for now");
                self.stream_off_until = Some(Instant::now() + STREAM_RETRY);
                None
            }
        }
    }
}

impl Sender {
    /// A batch's frame for the open stream: a stream frame, written against the ones sent on
    /// it before (a plain frame if there is no context, which cannot happen while a stream is
    /// open).
    fn encode(
        &mut self,
        enrolled: &Enrolled,
        seq: u64,
        records: &[Record],
    ) -> Result<Vec<u8>, BatchError> {
        let batch = Batch {
            device: enrolled.device.clone(),
            seq,
            readings: records
                .iter()
                .flat_map(|r| r.readings.iter().cloned())
                .collect(),
        };
        match self.stream_context.as_mut() {
            Some(context) => context.encode(&batch),
            None => batch::encode(&batch),
        }
    }
}
