//! The bridge: `POST /device/v1/batches`. It authenticates the device, checks the frame
//! (checksum, limits, that it names the credential's device, that no timestamp lies far in
//! the future), groups the readings by series and hands the batch to the ingest queue; the
//! `204` goes out only once the batch is durable. See docs/protocol.md, "Telemetry batches".

use axum::body::{Body, to_bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use drover_protocol::batch::{self, BatchError, MAX_BATCH_BYTES};
use drover_protocol::reading::Reading;

use crate::error::ApiError;
use crate::state::{DeviceAuth, HubState};
use crate::store::now_ms;
use crate::telemetry::fold::{FoldOutcome, IngestJob, Point, SeriesPoints};
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
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if content_type != batch::CONTENT_TYPE {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "content_type",
            format!(
                "send the batch with 'Content-Type: {}'",
                batch::CONTENT_TYPE
            ),
        ));
    }
    let frame = to_bytes(body, MAX_BATCH_BYTES).await.map_err(|_| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "batch_too_large",
            format!("a batch is at most {MAX_BATCH_BYTES} bytes; send smaller batches"),
        )
    })?;
    let decoded = batch::decode(&frame).map_err(|e| batch_error(&e))?;
    if decoded.device != device.id {
        return Err(ApiError::forbidden(
            "device_mismatch",
            format!(
                "the batch names device {} but the credential is device {}'s",
                decoded.device, device.id
            ),
        ));
    }
    let horizon = now_ms() + MAX_FUTURE_MS;
    if let Some(r) = decoded.readings.iter().find(|r| r.ts_ms > horizon) {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "implausible_batch",
            format!(
                "reading {} {} at {} ms lies more than {} minutes ahead of the hub's clock; check the device's clock",
                r.meter,
                r.channel.name(),
                r.ts_ms,
                MAX_FUTURE_MS / 60_000
            ),
        ));
    }
    let job = IngestJob {
        org_id: device.org_id,
        device: device.id.clone(),
        seq: Some(decoded.seq),
        series: group_by_series(decoded.readings),
        bytes: frame.len() as u64,
        spool_dropped: 0,
    };
    match hub.ingest.submit(job).await {
        Ok(FoldOutcome::Duplicate { last_seq }) => {
            // Stored before; the device learns the highest number stored, in case its own
            // counter went back (see docs/protocol.md).
            let mut response = StatusCode::NO_CONTENT.into_response();
            response
                .headers_mut()
                .insert(LAST_SEQ_HEADER, HeaderValue::from(last_seq));
            Ok(response)
        }
        Ok(FoldOutcome::Stored { .. }) => Ok(StatusCode::NO_CONTENT.into_response()),
        Err(QueueError::Full { retry_after }) => {
            let mut response = ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "queue_full",
                "the hub's ingest queue is full; nothing was stored; send the same batch again after Retry-After seconds",
            )
            .into_response();
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from(retry_after.as_secs().max(1)),
            );
            Ok(response)
        }
        Err(QueueError::Closed) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the hub is shutting down; nothing was stored; send the batch again later",
        )),
        Err(QueueError::Store(e)) => Err(ApiError::internal(e)),
    }
}

/// Groups readings (in the batch's canonical order: meter, channel, scale, time) into series.
pub fn group_by_series(readings: Vec<Reading>) -> Vec<SeriesPoints> {
    let mut series: Vec<SeriesPoints> = Vec::new();
    for r in readings {
        let point = Point {
            ts: r.ts_ms,
            value: r.value,
            clock: r.clock as u8,
        };
        match series.last_mut() {
            Some(s) if s.meter == r.meter && s.channel == r.channel && s.scale == r.scale => {
                s.points.push(point);
            }
            _ => series.push(SeriesPoints {
                meter: r.meter,
                channel: r.channel,
                scale: r.scale,
                points: vec![point],
            }),
        }
    }
    for s in &mut series {
        s.points.sort_by_key(|p| p.ts);
    }
    series
}
