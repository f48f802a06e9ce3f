//! The bridge: `POST /device/v1/batches` and the stream `POST /device/v1/batches/stream`. It
//! authenticates the device, checks the frame
//! (checksum, limits, that it names the credential's device, that no timestamp lies far in
//! the future), groups the readings by series and hands the batch to the ingest queue; the
//! `204` goes out only once the batch is durable. See docs/protocol.md, "Telemetry batches".

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::{Body, to_bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use drover_protocol::batch::stream::{self, MessageReader, Reply, StreamContext, StreamError};
use drover_protocol::batch::{self, BatchError, MAX_BATCH_BYTES};
use futures_util::StreamExt;
use tokio::sync::mpsc;

use crate::cache::CachedDevice;
use crate::error::ApiError;
use crate::state::{CredentialHash, DeviceAuth, HubState};
use crate::store::now_ms;
use crate::telemetry::fold::{IngestJob, IngestOutcome, group_by_series};
use crate::telemetry::queue::QueueError;

/// Readings more than this far ahead of the hub's clock are refused.
pub const MAX_FUTURE_MS: i64 = 10 * 60 * 1000;

/// The header of a `204` to a batch whose sequence number was already stored: the device's
/// highest stored sequence number.
pub const LAST_SEQ_HEADER: &str = "drover-last-seq";

fn batch_error(err: &BatchError) -> ApiError {
    let status = if matches!(err, BatchError::TooLarge { .. }) {
        StatusCode::PAYLOAD_TOO_LARGE
    } else {
        StatusCode::BAD_REQUEST
    };
    ApiError::new(status, err.code(), err.to_string())
}

/// `POST /device/v1/batches`.
pub async fn batches(
    State(hub): State<HubState>,
    DeviceAuth(device): DeviceAuth,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    check_content_type(&headers, batch::CONTENT_TYPE, "the batch")?;
    let frame = to_bytes(body, MAX_BATCH_BYTES).await.map_err(|_| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "batch_too_large",
            format!("a batch is at most {MAX_BATCH_BYTES} bytes; send smaller batches"),
        )
    })?;
    match ingest_frame(&hub, &device, &frame, None).await {
        Ok((_, IngestOutcome::Duplicate { last_seq })) => {
            // Stored before; the device learns the highest number stored, in case its own
            // counter went back (see docs/protocol.md).
            let mut response = StatusCode::NO_CONTENT.into_response();
            response
                .headers_mut()
                .insert(LAST_SEQ_HEADER, HeaderValue::from(last_seq));
            Ok(response)
        }
        Ok((_, IngestOutcome::Landed { .. })) => Ok(StatusCode::NO_CONTENT.into_response()),
        Err(refusal) => {
            let mut response = refusal.error.into_response();
            if let Some(wait) = refusal.retry_after {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(wait));
            }
            Ok(response)
        }
    }
}

fn check_content_type(headers: &HeaderMap, expected: &str, what: &str) -> Result<(), ApiError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if content_type == expected {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "content_type",
            format!("send {what} with 'Content-Type: {expected}'"),
        ))
    }
}

/// Why a frame was not stored: the error answer, its `Retry-After` in seconds, and the frame's
/// sequence number when it could be read.
#[derive(Debug)]
struct Refusal {
    error: ApiError,
    retry_after: Option<u64>,
    seq: u64,
}

impl From<ApiError> for Refusal {
    fn from(error: ApiError) -> Refusal {
        Refusal {
            error,
            retry_after: None,
            seq: 0,
        }
    }
}

/// Checks one frame from `device` and has it stored: its sequence number and what the store
/// did, once durable. On the stream, `context` is the stream's (a stream frame is read against
/// it, and every frame advances it).
async fn ingest_frame(
    hub: &HubState,
    device: &CachedDevice,
    frame: &[u8],
    context: Option<&mut StreamContext>,
) -> Result<(u64, IngestOutcome), Refusal> {
    let decoded = match context {
        Some(context) => context.decode(frame),
        None => batch::decode(frame),
    }
    .map_err(|e| batch_error(&e))?;
    let seq = decoded.seq;
    let refuse = |error: ApiError| Refusal {
        error,
        retry_after: None,
        seq,
    };
    if decoded.device != device.id {
        return Err(refuse(ApiError::forbidden(
            "device_mismatch",
            format!(
                "the batch names device {} but the credential is device {}'s",
                decoded.device, device.id
            ),
        )));
    }
    let horizon = now_ms() + MAX_FUTURE_MS;
    if let Some(r) = decoded.readings.iter().find(|r| r.ts_ms > horizon) {
        return Err(refuse(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "implausible_batch",
            format!(
                "reading {} {} at {} ms lies more than {} minutes ahead of the hub's clock; check the device's clock",
                r.meter,
                r.channel.name(),
                r.ts_ms,
                MAX_FUTURE_MS / 60_000
            ),
        )));
    }
    let plain = frame.first() == Some(&batch::FORMAT_VERSION);
    let job = IngestJob {
        org_id: device.org_id,
        device: device.id.clone(),
        seq: Some(seq),
        series: group_by_series(decoded.readings),
        bytes: frame.len() as u64,
        frame: plain.then(|| frame.to_vec()),
    };
    match hub.ingest.submit(job).await {
        Ok(outcome) => Ok((seq, outcome)),
        Err(QueueError::Full { retry_after }) => Err(Refusal {
            error: ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "queue_full",
                "the hub's ingest queue is full; nothing was stored; send the same batch again after Retry-After seconds",
            ),
            retry_after: Some(retry_after.as_secs().max(1)),
            seq,
        }),
        Err(QueueError::Closed) => Err(refuse(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the hub is shutting down; nothing was stored; send the batch again later",
        ))),
        Err(QueueError::Store(e)) => Err(refuse(ApiError::internal(e))),
    }
}

/// `POST /device/v1/batches/stream`: batches on one long-lived request, answered only when the
/// device asks (see [`drover_protocol::batch::stream`] and docs/protocol.md, "Telemetry
/// stream"). The answer's head goes out at once, with `Drover-Last-Seq`; its body carries the
/// replies.
pub async fn stream(
    State(hub): State<HubState>,
    DeviceAuth(device): DeviceAuth,
    CredentialHash(credential): CredentialHash,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    check_content_type(&headers, stream::CONTENT_TYPE, "the stream")?;
    let last = hub.store.last_batch_seq(device.org_id, &device.id).await?;
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(4);
    tokio::spawn(run_stream(hub, device, credential, body, tx, last));
    let replies = futures_util::stream::poll_fn(move |cx| {
        rx.poll_recv(cx).map(|line| line.map(Ok::<_, Infallible>))
    });
    let mut response = Body::from_stream(replies).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(stream::REPLY_CONTENT_TYPE),
    );
    headers.insert(LAST_SEQ_HEADER, HeaderValue::from(last));
    Ok(response)
}

/// Reads the stream's messages in order, one at a time: a frame is stored (durably) before the
/// next one is read, so the device's batches are stored in the order of their sequence numbers
/// and, after a refusal, nothing later on the stream is. Ends at the first refusal, when the
/// device ends its body, or when the hub shuts down.
async fn run_stream(
    hub: HubState,
    mut device: Arc<CachedDevice>,
    credential: String,
    body: Body,
    tx: mpsc::Sender<Vec<u8>>,
    mut last: u64,
) {
    let mut data = body.into_data_stream();
    let mut reader = MessageReader::new();
    let mut context = StreamContext::new(device.id.clone(), last);
    loop {
        loop {
            let message = match reader.next_message() {
                Ok(Some(message)) => message,
                Ok(None) => break,
                Err(e) => {
                    let status = if matches!(e, StreamError::TooLarge { .. }) {
                        StatusCode::PAYLOAD_TOO_LARGE
                    } else {
                        StatusCode::BAD_REQUEST
                    };
                    let error = ApiError::new(status, e.code(), e.to_string());
                    let _ = tx.send(refused(error.into(), last)).await;
                    return;
                }
            };
            if !message.frame.is_empty() {
                // Authenticated again for every batch: a device revoked while its stream is
                // open is stopped here.
                let result = match hub.device_by_hash(&credential).await {
                    Ok(current) if current.id == device.id => {
                        device = current;
                        ingest_frame(&hub, &device, &message.frame, Some(&mut context)).await
                    }
                    Ok(_) => Err(ApiError::unauthorized(
                        "invalid_credential",
                        "this device credential now belongs to another device",
                    )
                    .into()),
                    Err(e) => Err(e.into()),
                };
                match result {
                    Ok((seq, IngestOutcome::Landed { .. })) => last = last.max(seq),
                    Ok((_, IngestOutcome::Duplicate { last_seq })) => last = last.max(last_seq),
                    Err(refusal) => {
                        let _ = tx.send(refused(refusal, last)).await;
                        return;
                    }
                }
            }
            if message.ack
                && tx
                    .send(Reply::Stored { stored: last }.to_line())
                    .await
                    .is_err()
            {
                return;
            }
        }
        tokio::select! {
            chunk = data.next() => match chunk {
                Some(Ok(bytes)) => reader.push(&bytes),
                // The device went away mid-message or the connection broke: nobody to answer.
                Some(Err(_)) => return,
                None => {
                    let reply = match reader.finish() {
                        Ok(()) => Reply::Stored { stored: last }.to_line(),
                        Err(e) => refused(ApiError::bad_request(e.code(), e.to_string()).into(), last),
                    };
                    let _ = tx.send(reply).await;
                    return;
                }
            },
            () = hub.shutdown.cancelled() => {
                let _ = tx.send(refused(Refusal {
                    error: ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "shutting_down",
                        "the hub is shutting down; batches after the last one stored were not read; send them again later",
                    ),
                    retry_after: Some(1),
                    seq: 0,
                }, last)).await;
                return;
            }
            () = tx.closed() => return,
        }
    }
}

/// A refusal's lines: what is stored, then the refusal (so the device knows that the refused
/// frame is its oldest one not stored, even when the frame could not be read).
fn refused(refusal: Refusal, last: u64) -> Vec<u8> {
    let mut lines = Reply::Stored { stored: last }.to_line();
    lines.extend(
        Reply::Refused {
            refused: refusal.seq,
            status: refusal.error.status.as_u16(),
            error: refusal.error.code.to_owned(),
            message: refusal.error.message,
            retry_after_s: refusal.retry_after,
        }
        .to_line(),
    );
    lines
}
