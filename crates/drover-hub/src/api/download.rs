//! Serving artifact bytes with HTTP Range and ETag, so that a download cut off on a shaky
//! cellular link resumes where it stopped instead of starting over.
//!
//! The ETag is the artifact's SHA-256 (content-addressed, so it never changes for a URL).
//! Supported: `If-None-Match` (→ 304), a single `Range: bytes=a-b | a- | -n` (→ 206, or 416
//! when it starts past the end), and `If-Range` (a range is honoured only if the ETag still
//! matches). Several ranges in one request are answered with the whole file, as RFC 9110 allows.

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::artifacts::{ArtifactStore, is_sha256_hex};
use crate::error::ApiError;

/// A byte range, inclusive at both ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    /// First byte.
    pub start: u64,
    /// Last byte.
    pub end: u64,
}

/// What a `Range` header asks of a file of `size` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeRequest {
    /// No (usable) range: send everything.
    Full,
    /// One satisfiable range.
    Partial(ByteRange),
    /// A range that starts past the end.
    Unsatisfiable,
}

/// Parses a `Range` header value against a file size.
pub fn parse_range(value: &str, size: u64) -> RangeRequest {
    let Some(spec) = value.trim().strip_prefix("bytes=") else {
        return RangeRequest::Full;
    };
    if spec.contains(',') {
        return RangeRequest::Full;
    }
    let Some((first, last)) = spec.split_once('-') else {
        return RangeRequest::Full;
    };
    let (first, last) = (first.trim(), last.trim());
    let parsed = match (first.is_empty(), last.is_empty()) {
        // bytes=-n: the last n bytes.
        (true, false) => match last.parse::<u64>() {
            Ok(0) => return RangeRequest::Unsatisfiable,
            Ok(n) => Some((size.saturating_sub(n), size.saturating_sub(1))),
            Err(_) => None,
        },
        // bytes=a-: from a to the end.
        (false, true) => first
            .parse::<u64>()
            .ok()
            .map(|a| (a, size.saturating_sub(1))),
        // bytes=a-b.
        (false, false) => match (first.parse::<u64>(), last.parse::<u64>()) {
            (Ok(a), Ok(b)) if a <= b => Some((a, b.min(size.saturating_sub(1)))),
            _ => None,
        },
        (true, true) => None,
    };
    match parsed {
        None => RangeRequest::Full,
        Some((start, _)) if start >= size => RangeRequest::Unsatisfiable,
        Some((start, end)) => RangeRequest::Partial(ByteRange { start, end }),
    }
}

fn etag_matches(header_value: Option<&HeaderValue>, etag: &str) -> bool {
    header_value.and_then(|v| v.to_str().ok()).is_some_and(|v| {
        v.split(',')
            .map(|t| t.trim().trim_start_matches("W/"))
            .any(|t| t == etag || t == "*")
    })
}

/// Answers a GET (or HEAD) for an artifact.
pub async fn serve_artifact(
    artifacts: &dyn ArtifactStore,
    sha256: &str,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    if !is_sha256_hex(sha256) {
        return Err(ApiError::bad_request(
            "invalid_sha256",
            "artifacts are named by their SHA-256 in lower-case hex (64 characters)",
        ));
    }
    let info = artifacts
        .stat(sha256)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("artifact {sha256}")))?;
    let etag = format!("\"{sha256}\"");
    let etag_value = HeaderValue::from_str(&etag).map_err(ApiError::internal)?;
    if etag_matches(headers.get(header::IF_NONE_MATCH), &etag) {
        return Ok((StatusCode::NOT_MODIFIED, [(header::ETAG, etag_value)]).into_response());
    }
    let mut range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .map_or(RangeRequest::Full, |v| parse_range(v, info.size));
    if headers.contains_key(header::IF_RANGE) && !etag_matches(headers.get(header::IF_RANGE), &etag)
    {
        range = RangeRequest::Full;
    }
    let (status, byte_range) = match range {
        RangeRequest::Unsatisfiable => {
            return Ok((
                StatusCode::RANGE_NOT_SATISFIABLE,
                [
                    (header::CONTENT_RANGE, format!("bytes */{}", info.size)),
                    (header::ETAG, etag),
                ],
            )
                .into_response());
        }
        RangeRequest::Partial(r) => (StatusCode::PARTIAL_CONTENT, r),
        RangeRequest::Full => (
            StatusCode::OK,
            ByteRange {
                start: 0,
                end: info.size.saturating_sub(1),
            },
        ),
    };
    let length = if info.size == 0 {
        0
    } else {
        byte_range.end - byte_range.start + 1
    };
    let body = if length == 0 {
        Body::empty()
    } else {
        Body::from_stream(
            artifacts
                .read_range(sha256, byte_range.start, byte_range.end)
                .await?,
        )
    };
    let mut response = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, length)
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::ETAG, etag_value);
    if status == StatusCode::PARTIAL_CONTENT {
        response = response.header(
            header::CONTENT_RANGE,
            format!(
                "bytes {}-{}/{}",
                byte_range.start, byte_range.end, info.size
            ),
        );
    }
    response.body(body).map_err(ApiError::internal)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn partial(start: u64, end: u64) -> RangeRequest {
        RangeRequest::Partial(ByteRange { start, end })
    }

    #[test]
    fn ranges_parse_like_rfc_9110() {
        assert_eq!(parse_range("bytes=0-9", 100), partial(0, 9));
        assert_eq!(parse_range("bytes=90-", 100), partial(90, 99));
        assert_eq!(parse_range("bytes=-10", 100), partial(90, 99));
        assert_eq!(parse_range("bytes=-500", 100), partial(0, 99));
        assert_eq!(parse_range("bytes=50-500", 100), partial(50, 99));
        assert_eq!(parse_range("bytes=100-", 100), RangeRequest::Unsatisfiable);
        assert_eq!(parse_range("bytes=-0", 100), RangeRequest::Unsatisfiable);
        assert_eq!(parse_range("bytes=5-1", 100), RangeRequest::Full);
        assert_eq!(parse_range("bytes=0-1,5-6", 100), RangeRequest::Full);
        assert_eq!(parse_range("items=0-1", 100), RangeRequest::Full);
        assert_eq!(parse_range("bytes=x-", 100), RangeRequest::Full);
    }
}
