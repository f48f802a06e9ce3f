//! The HTTP side of the device API (`/device/v1/...`): one reqwest client, one error type, and
//! the status-code handling every call shares. Message types come from `drover_protocol`.

use std::sync::Arc;
use std::time::Duration;

use drover_protocol::batch::stream::{self, Reply};
use drover_protocol::device::{
    CheckinRequest, DesiredState, EnrollRequest, EnrollResponse, ReportAck, ReportBatch,
};
use drover_protocol::error::ErrorBody;
use reqwest::StatusCode;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;

use crate::config::AgentConfig;

/// How long to wait for a TCP and TLS connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// How long an API call (not a download) may take in all; also how long the telemetry stream
/// waits for an answer it asked for.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a download may go without receiving a byte (applied by the download itself: a
/// client-wide read timeout would also end the telemetry stream, whose answers are minutes
/// apart).
pub const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// How long an idle connection to the hub is kept for the next request. Longer than the usual
/// batch and check-in intervals (up to 5 minutes), so that they reuse one TLS connection
/// instead of paying a handshake (about 2 KB) each time; a NAT that forgets the connection
/// first costs one failed request, which is retried.
const POOL_IDLE: Duration = Duration::from_secs(10 * 60);
/// The most of an error body kept for a message.
const MAX_ERROR_BODY: usize = 2048;

/// A failed call to the hub.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// The client could not be built (for example, an unreadable `ca_file`).
    #[error("setting up the hub connection: {0}")]
    Setup(String),
    /// The hub could not be reached, or the connection broke.
    #[error("cannot reach the hub ({what}): {}", error_chain(source))]
    Network {
        /// The call.
        what: &'static str,
        /// reqwest's error, with its causes.
        source: reqwest::Error,
    },
    /// The hub answered with an error status.
    #[error("the hub refused {what} with {status}: {code}: {message}")]
    Refused {
        /// The call.
        what: &'static str,
        /// The HTTP status.
        status: StatusCode,
        /// The error code from the body (`invalid_credential`, ...), or `-`.
        code: String,
        /// The message from the body.
        message: String,
        /// The wait the hub asked for (`Retry-After` in seconds), with `503` and `429`.
        retry_after: Option<Duration>,
    },
    /// The hub's answer could not be understood.
    #[error("the hub's answer to {what} is not valid: {message}")]
    BadAnswer {
        /// The call.
        what: &'static str,
        /// What was wrong.
        message: String,
    },
}

impl HubError {
    /// The HTTP status, for refusals.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            HubError::Refused { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The error code from the body, for refusals.
    pub fn code(&self) -> Option<&str> {
        match self {
            HubError::Refused { code, .. } => Some(code),
            _ => None,
        }
    }

    /// How long the hub asked the device to wait before trying again, if it did.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            HubError::Refused { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// Whether trying again later may help (network trouble, 5xx, 408, 429).
    pub fn is_transient(&self) -> bool {
        match self {
            HubError::Network { .. } | HubError::BadAnswer { .. } => true,
            HubError::Refused { status, .. } => {
                status.is_server_error()
                    || *status == StatusCode::REQUEST_TIMEOUT
                    || *status == StatusCode::TOO_MANY_REQUESTS
            }
            HubError::Setup(_) => false,
        }
    }
}

/// An open telemetry stream. Dropping it ends the request body; the hub then answers what it
/// stored and ends its side.
#[derive(Debug)]
pub struct BatchStream {
    body: mpsc::Sender<Vec<u8>>,
    replies: mpsc::Receiver<Reply>,
    reader: tokio::task::JoinHandle<()>,
    /// The highest sequence number the hub had stored for the device when the stream opened.
    pub last_seq: u64,
}

impl BatchStream {
    /// Sends one message (see [`stream::encode_message`]); `false` when the stream has ended.
    pub async fn send(&self, message: Vec<u8>) -> bool {
        self.body.send(message).await.is_ok()
    }

    /// The next reply; `None` when the stream has ended.
    pub async fn reply(&mut self) -> Option<Reply> {
        self.replies.recv().await
    }

    /// What the hub said before the stream ended, once a send found it gone: the hub ends its
    /// side right after a refusal, so the refusal usually lies here. Waits at most `patience`
    /// for the rest of the answer.
    pub async fn last_words(&mut self, patience: Duration) -> Vec<Reply> {
        let mut replies = Vec::new();
        let deadline = tokio::time::Instant::now() + patience;
        while let Ok(Some(reply)) = tokio::time::timeout_at(deadline, self.replies.recv()).await {
            replies.push(reply);
        }
        replies
    }

    /// A reply that has arrived already, without waiting.
    pub fn try_reply(&mut self) -> Result<Option<Reply>, StreamEnded> {
        match self.replies.try_recv() {
            Ok(reply) => Ok(Some(reply)),
            Err(mpsc::error::TryRecvError::Empty) => Ok(None),
            Err(mpsc::error::TryRecvError::Disconnected) => Err(StreamEnded),
        }
    }
}

/// The telemetry stream has ended (the hub ended it, or the connection broke).
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the telemetry stream has ended")]
pub struct StreamEnded;

impl Drop for BatchStream {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// A connection to the hub's device API.
#[derive(Debug, Clone)]
pub struct HubClient {
    http: reqwest::Client,
    base: Arc<str>,
}

impl HubClient {
    /// Builds the client: the configured CA only when `ca_file` is set, the platform's trust
    /// store otherwise.
    pub fn new(config: &AgentConfig) -> Result<HubClient, HubError> {
        // reqwest is built without a default crypto provider; the process gets ring. A second
        // call finds one installed already, which is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let base = config.hub_base().map_err(HubError::Setup)?;
        let mut builder = reqwest::Client::builder()
            .user_agent(concat!("drover-agent/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(CONNECT_TIMEOUT)
            .pool_idle_timeout(POOL_IDLE);
        if let Some(ca_file) = &config.ca_file {
            builder = builder.tls_backend_preconfigured(tls_trusting_only(ca_file)?);
        }
        let http = builder
            .build()
            .map_err(|e| HubError::Setup(format!("{e:#}")))?;
        Ok(HubClient {
            http,
            base: base.into(),
        })
    }

    /// The absolute URL for a path on the hub (`/device/v1/...`).
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Resolves a URL the hub handed out (an artifact URL): a path on the hub, or an absolute
    /// URL on the hub itself. Anything else is refused, so that the device credential is never
    /// sent to another host.
    pub fn resolve(&self, url: &str) -> Option<String> {
        if url.starts_with('/') && !url.starts_with("//") {
            return Some(self.url(url));
        }
        url.strip_prefix(&*self.base)
            .filter(|rest| rest.starts_with('/'))
            .map(|_| url.to_string())
    }

    /// `POST /device/v1/enroll`.
    pub async fn enroll(&self, request: &EnrollRequest) -> Result<EnrollResponse, HubError> {
        let what = "enrolment";
        let response = self.post("/device/v1/enroll", None, request, what).await?;
        json(response, what).await
    }

    /// `POST /device/v1/checkin`: `None` for `204 No Content` (nothing changed).
    pub async fn checkin(
        &self,
        credential: &str,
        request: &CheckinRequest,
    ) -> Result<Option<DesiredState>, HubError> {
        let what = "check-in";
        let response = self
            .post("/device/v1/checkin", Some(credential), request, what)
            .await?;
        if response.status() == StatusCode::NO_CONTENT {
            return Ok(None);
        }
        json(response, what).await.map(Some)
    }

    /// `POST /device/v1/reports`.
    pub async fn reports(
        &self,
        credential: &str,
        batch: &ReportBatch,
    ) -> Result<ReportAck, HubError> {
        let what = "report delivery";
        let response = self
            .post("/device/v1/reports", Some(credential), batch, what)
            .await?;
        json(response, what).await
    }

    /// `POST /device/v1/batches`: one encoded telemetry batch. `Ok` means the hub has stored
    /// it durably, now (`None`) or before (`Some` of the highest sequence number the hub has
    /// stored for the device: the batch's number was not new).
    pub async fn batch(&self, credential: &str, frame: Vec<u8>) -> Result<Option<u64>, HubError> {
        let what = "telemetry batch";
        let response = self
            .http
            .post(self.url("/device/v1/batches"))
            .timeout(CALL_TIMEOUT)
            .bearer_auth(credential)
            .header(
                reqwest::header::CONTENT_TYPE,
                drover_protocol::batch::CONTENT_TYPE,
            )
            .body(frame)
            .send()
            .await
            .map_err(|source| HubError::Network { what, source })?;
        if response.status().is_success() {
            Ok(response
                .headers()
                .get("drover-last-seq")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok()))
        } else {
            Err(refusal(response, what).await)
        }
    }

    /// Opens the telemetry stream (`POST /device/v1/batches/stream`). The hub answers at once;
    /// batches then go with [`BatchStream::send`] and its replies come from
    /// [`BatchStream::reply`].
    pub async fn open_stream(&self, credential: &str) -> Result<BatchStream, HubError> {
        let what = "telemetry stream";
        let (body_tx, mut body_rx) = mpsc::channel::<Vec<u8>>(16);
        let body = reqwest::Body::wrap_stream(futures_util::stream::poll_fn(move |cx| {
            body_rx
                .poll_recv(cx)
                .map(|m| m.map(Ok::<_, std::io::Error>))
        }));
        let request = self
            .http
            .post(self.url("/device/v1/batches/stream"))
            .bearer_auth(credential)
            .header(reqwest::header::CONTENT_TYPE, stream::CONTENT_TYPE)
            .body(body)
            .send();
        let mut response = match tokio::time::timeout(CALL_TIMEOUT, request).await {
            Ok(result) => result.map_err(|source| HubError::Network { what, source })?,
            Err(_) => {
                return Err(HubError::BadAnswer {
                    what,
                    message: format!("no answer within {}s", CALL_TIMEOUT.as_secs()),
                });
            }
        };
        if !response.status().is_success() {
            return Err(refusal(response, what).await);
        }
        let last_seq = response
            .headers()
            .get("drover-last-seq")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| HubError::BadAnswer {
                what,
                message: "no Drover-Last-Seq header".into(),
            })?;
        let (reply_tx, replies) = mpsc::channel(16);
        let reader = tokio::spawn(async move {
            let mut buf: Vec<u8> = Vec::new();
            while let Ok(Some(chunk)) = response.chunk().await {
                buf.extend_from_slice(&chunk);
                while let Some(end) = buf.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=end).collect();
                    match serde_json::from_slice::<Reply>(&line[..end]) {
                        Ok(reply) => {
                            if reply_tx.send(reply).await.is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "telemetry: the hub's stream reply is not valid; closing the stream");
                            return;
                        }
                    }
                }
                if buf.len() > MAX_ERROR_BODY * 4 {
                    tracing::warn!(
                        "telemetry: the hub's stream reply line is too long; closing the stream"
                    );
                    return;
                }
            }
        });
        Ok(BatchStream {
            body: body_tx,
            replies,
            reader,
            last_seq,
        })
    }

    /// `GET` an artifact, from `offset` on when resuming (with `If-Range`, so that a changed
    /// artifact comes back whole). The status is the caller's to check.
    pub async fn artifact(
        &self,
        url: &str,
        credential: &str,
        offset: u64,
        etag: &str,
    ) -> Result<reqwest::Response, HubError> {
        let mut request = self.http.get(url).bearer_auth(credential);
        if offset > 0 {
            request = request
                .header(reqwest::header::RANGE, format!("bytes={offset}-"))
                .header(reqwest::header::IF_RANGE, etag);
        }
        match tokio::time::timeout(READ_TIMEOUT, request.send()).await {
            Ok(result) => result.map_err(|source| HubError::Network {
                what: "artifact download",
                source,
            }),
            Err(_) => Err(HubError::BadAnswer {
                what: "artifact download",
                message: format!("no answer within {}s", READ_TIMEOUT.as_secs()),
            }),
        }
    }

    async fn post<T: Serialize>(
        &self,
        path: &str,
        credential: Option<&str>,
        body: &T,
        what: &'static str,
    ) -> Result<reqwest::Response, HubError> {
        let mut request = self
            .http
            .post(self.url(path))
            .timeout(CALL_TIMEOUT)
            .json(body);
        if let Some(credential) = credential {
            request = request.bearer_auth(credential);
        }
        let response = request
            .send()
            .await
            .map_err(|source| HubError::Network { what, source })?;
        if response.status().is_success() {
            Ok(response)
        } else {
            Err(refusal(response, what).await)
        }
    }
}

/// An error and its causes on one line (reqwest's own message leaves out why a connection
/// failed: refused, reset, a certificate problem).
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// Turns an error response into [`HubError::Refused`], reading the JSON error body if there
/// is one.
pub async fn refusal(response: reqwest::Response, what: &'static str) -> HubError {
    let status = response.status();
    let retry_after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let text = response.text().await.unwrap_or_default();
    let (code, message) = match serde_json::from_str::<ErrorBody>(&text) {
        Ok(body) => (body.error, body.message),
        Err(_) => {
            let mut cut = text.trim().to_string();
            if cut.len() > MAX_ERROR_BODY {
                cut = drover_protocol::device::truncate_output(&cut, MAX_ERROR_BODY);
            }
            ("-".to_string(), cut)
        }
    };
    HubError::Refused {
        what,
        status,
        code,
        message,
        retry_after,
    }
}

async fn json<T: DeserializeOwned>(
    response: reqwest::Response,
    what: &'static str,
) -> Result<T, HubError> {
    let bytes = response
        .bytes()
        .await
        .map_err(|source| HubError::Network { what, source })?;
    serde_json::from_slice(&bytes).map_err(|e| HubError::BadAnswer {
        what,
        message: e.to_string(),
    })
}

/// A rustls config that trusts only the CA certificates in `ca_file`.
fn tls_trusting_only(ca_file: &std::path::Path) -> Result<rustls::ClientConfig, HubError> {
    let setup =
        |message: String| HubError::Setup(format!("ca_file {}: {message}", ca_file.display()));
    let pem = std::fs::read(ca_file).map_err(|e| setup(e.to_string()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        let cert = cert.map_err(|e| setup(format!("not valid PEM: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| setup(format!("not a usable CA certificate: {e}")))?;
    }
    if roots.is_empty() {
        return Err(setup("holds no certificate".into()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| setup(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    // As reqwest offers for the platform's trust store: HTTP/2 where the hub speaks it (its
    // compressed headers keep telemetry batches small), HTTP/1.1 otherwise.
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(hub_url: &str) -> HubClient {
        let config = AgentConfig {
            hub_url: hub_url.into(),
            device_type: "rpi4".into(),
            ..AgentConfig::default()
        };
        HubClient::new(&config).unwrap()
    }

    #[test]
    fn artifact_urls_stay_on_the_hub() {
        let hub = client("https://hub.example.com:8443/drover/");
        assert_eq!(
            hub.resolve("/device/v1/artifacts/ab").as_deref(),
            Some("https://hub.example.com:8443/drover/device/v1/artifacts/ab")
        );
        assert_eq!(
            hub.resolve("https://hub.example.com:8443/drover/x")
                .as_deref(),
            Some("https://hub.example.com:8443/drover/x")
        );
        assert_eq!(hub.resolve("https://evil.example.com/x"), None);
        assert_eq!(hub.resolve("https://hub.example.com:8443/droverx"), None);
        assert_eq!(hub.resolve("//evil.example.com/x"), None);
    }

    #[test]
    fn a_bad_ca_file_is_a_clear_setup_error() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "not a certificate").unwrap();
        let config = AgentConfig {
            hub_url: "https://127.0.0.1:1".into(),
            device_type: "rpi4".into(),
            ca_file: Some(ca),
            ..AgentConfig::default()
        };
        let err = HubClient::new(&config).unwrap_err().to_string();
        assert!(
            err.contains("ca.pem") && err.contains("no certificate"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn network_errors_say_why() {
        let hub = client("http://127.0.0.1:9");
        let request = drover_protocol::device::CheckinRequest {
            protocol: 1,
            desired_etag: None,
            current_release: None,
            agent_version: "0".into(),
            update: drover_protocol::device::UpdateStatus::idle(),
            facts: None,
            telemetry: None,
        };
        let err = hub.checkin("x", &request).await.unwrap_err();
        assert!(err.is_transient());
        let text = err.to_string();
        assert!(text.to_lowercase().contains("refused"), "{text}");
    }

    #[test]
    fn transient_errors_are_told_apart() {
        let refused = |status: u16| HubError::Refused {
            what: "x",
            status: StatusCode::from_u16(status).unwrap(),
            code: "-".into(),
            message: String::new(),
            retry_after: None,
        };
        assert!(refused(503).is_transient());
        assert!(refused(429).is_transient());
        assert!(!refused(400).is_transient());
        assert!(!refused(401).is_transient());
    }
}
