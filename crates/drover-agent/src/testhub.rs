//! A small fake hub for the agent's own tests: the device API over plain HTTP/1.1 on
//! `127.0.0.1:0`, with knobs for the failures the agent must survive (cut downloads, refused
//! reports, pending and revoked devices). The real hub has its own tests; this one exists so the
//! agent's behaviour can be tested without it, byte for byte as the protocol crate defines it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use drover_protocol::device::{
    CheckinRequest, DesiredState, DeviceStatus, EnrollRequest, EnrollResponse, Module,
    ReleaseOffer, ReportAck, ReportBatch, UpdateReport,
};
use drover_protocol::ids::DeviceId;
use drover_protocol::signing::{ReleasePublicKey, ReleaseSigningKey, enrolment_message};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

/// What the fake hub knows and has seen.
#[derive(Debug)]
pub struct HubState {
    /// Answered to check-ins whose etag differs.
    pub desired: Option<DesiredState>,
    /// Artifacts by SHA-256.
    pub artifacts: HashMap<String, Vec<u8>>,
    /// Every report received, in order (duplicates included).
    pub reports: Vec<UpdateReport>,
    /// Every check-in received.
    pub checkins: Vec<(std::time::Instant, CheckinRequest)>,
    /// How many enrolments were answered.
    pub enrolments: u32,
    /// The device's standing.
    pub status: DeviceStatus,
    /// The credential the hub accepts.
    pub credential: Option<String>,
    /// The release key handed out at enrolment.
    pub release_key: Option<String>,
    /// Close the next artifact response after this many body bytes.
    pub cut_next_download_after: Option<usize>,
    /// The `Range` header of every artifact request.
    pub artifact_ranges: Vec<Option<String>>,
    /// Answer report batches with this status instead of storing them.
    pub refuse_reports_with: Option<u16>,
    /// How many check-ins were refused (pending, revoked, bad credential).
    pub refused: u32,
    /// When each refused check-in arrived.
    pub refused_at: Vec<std::time::Instant>,
}

/// A running fake hub.
pub struct FakeHub {
    /// `http://127.0.0.1:<port>`.
    pub url: String,
    state: Arc<Mutex<HubState>>,
    /// The fleet's release key.
    pub key: ReleaseSigningKey,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeHub {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeHub {
    /// Starts a hub whose devices are accepted at once.
    pub async fn start() -> FakeHub {
        let key = ReleaseSigningKey::generate();
        let state = Arc::new(Mutex::new(HubState {
            desired: None,
            artifacts: HashMap::new(),
            reports: Vec::new(),
            checkins: Vec::new(),
            enrolments: 0,
            status: DeviceStatus::Accepted,
            credential: None,
            release_key: Some(key.public().to_string()),
            cut_next_download_after: None,
            artifact_ranges: Vec::new(),
            refuse_reports_with: None,
            refused: 0,
            refused_at: Vec::new(),
        }));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let shared = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let state = shared.clone();
                tokio::spawn(async move {
                    let _ = serve(stream, state).await;
                });
            }
        });
        FakeHub {
            url,
            state,
            key,
            task,
        }
    }

    /// The hub's state, to change knobs or inspect what it saw.
    pub fn state(&self) -> MutexGuard<'_, HubState> {
        self.state.lock().unwrap()
    }

    /// Stores an artifact and targets a signed release of it.
    pub fn deploy(&self, version: &str, module: Module, bytes: &[u8]) -> ReleaseOffer {
        let offer = self.offer(version, module, bytes);
        let mut state = self.state();
        state.artifacts.insert(offer.sha256.clone(), bytes.to_vec());
        let generation = state.desired.as_ref().map_or(0, |d| d.retry_generation);
        state.desired = Some(DesiredState {
            etag: format!("etag-{version}-{}", state.checkins.len()),
            poll_interval_s: 0,
            release: Some(offer.clone()),
            config: serde_json::json!({"greeting": "hello"}),
            retry_generation: generation,
        });
        offer
    }

    /// A signed offer for `bytes` (not stored).
    pub fn offer(&self, version: &str, module: Module, bytes: &[u8]) -> ReleaseOffer {
        let sha256 = drover_protocol::ids::sha256_hex(bytes);
        let mut offer = ReleaseOffer {
            version: version.into(),
            module,
            device_type: Some("test-device".into()),
            artifact_url: format!("/device/v1/artifacts/{sha256}"),
            size: bytes.len() as u64,
            sha256,
            signature: String::new(),
        };
        offer.signature = offer.manifest().sign(&self.key);
        offer
    }

    /// The states of the reports received for `release`, in order.
    pub fn report_states(&self, release: &str) -> Vec<&'static str> {
        self.state()
            .reports
            .iter()
            .filter(|r| r.release == release)
            .map(|r| r.state.as_str())
            .collect()
    }
}

struct Request {
    method: String,
    path: String,
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

async fn read_request(stream: &mut TcpStream) -> Option<Request> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let method = first.next()?.to_string();
    let path = first.next()?.to_string();
    let headers: HashMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let len: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = buf[head_end + 4..].to_vec();
    while body.len() < len {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Some(Request {
        method,
        path,
        headers,
        body,
    })
}

async fn respond(
    stream: &mut TcpStream,
    status: u16,
    headers: &[(&str, String)],
    body: &[u8],
    cut_after: Option<usize>,
) -> std::io::Result<()> {
    let mut head = format!(
        "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await?;
    let sent = cut_after.map_or(body.len(), |n| n.min(body.len()));
    stream.write_all(&body[..sent]).await?;
    stream.flush().await?;
    stream.shutdown().await
}

fn error(status: u16, code: &str) -> (u16, Vec<u8>) {
    let body = serde_json::json!({"error": code, "message": format!("fake hub: {code}")});
    (status, body.to_string().into_bytes())
}

async fn serve(mut stream: TcpStream, state: Arc<Mutex<HubState>>) -> std::io::Result<()> {
    let Some(request) = read_request(&mut stream).await else {
        return Ok(());
    };
    if request.method == "GET" && request.path.starts_with("/device/v1/artifacts/") {
        return serve_artifact(&mut stream, &state, &request).await;
    }
    let (status, body) = {
        let mut state = state.lock().unwrap();
        route(&mut state, &request)
    };
    let json = [("Content-Type", "application/json".to_string())];
    respond(
        &mut stream,
        status,
        if body.is_empty() { &[] } else { &json },
        &body,
        None,
    )
    .await
}

fn authorised(state: &HubState, request: &Request) -> Result<(), (u16, Vec<u8>)> {
    let given = request
        .headers
        .get("authorization")
        .cloned()
        .unwrap_or_default();
    match &state.credential {
        Some(c) if given == format!("Bearer {c}") => {}
        _ => return Err(error(401, "invalid_credential")),
    }
    match state.status {
        DeviceStatus::Accepted => Ok(()),
        DeviceStatus::Pending => Err(error(403, "device_pending")),
        DeviceStatus::Revoked => Err(error(403, "device_revoked")),
    }
}

fn route(state: &mut HubState, request: &Request) -> (u16, Vec<u8>) {
    match (request.method.as_str(), request.path.as_str()) {
        ("POST", "/device/v1/enroll") => {
            let Ok(enrol) = serde_json::from_slice::<EnrollRequest>(&request.body) else {
                return error(400, "invalid_json");
            };
            let proof_ok = ReleasePublicKey::parse(&enrol.public_key).is_ok_and(|k| {
                k.verify_raw(
                    &enrolment_message(&enrol.public_key, &enrol.device_type),
                    &enrol.proof,
                )
                .is_ok()
            });
            if !proof_ok {
                return error(400, "invalid_proof");
            }
            if enrol.provisioning_key != "drv_p_test" {
                return error(401, "invalid_provisioning_key");
            }
            if state.status == DeviceStatus::Revoked {
                return error(403, "device_revoked");
            }
            state.enrolments += 1;
            let credential = format!("drv_d_test{}", state.enrolments);
            state.credential = Some(credential.clone());
            let answer = EnrollResponse {
                device_id: DeviceId::parse("testdevice").unwrap(),
                credential,
                status: state.status,
                fleet: "test-fleet".into(),
                release_key: state.release_key.clone(),
            };
            (200, serde_json::to_vec(&answer).unwrap())
        }
        ("POST", "/device/v1/checkin") => {
            if let Err(refused) = authorised(state, request) {
                state.refused += 1;
                state.refused_at.push(std::time::Instant::now());
                return refused;
            }
            let Ok(checkin) = serde_json::from_slice::<CheckinRequest>(&request.body) else {
                return error(400, "invalid_json");
            };
            let etag = checkin.desired_etag.clone();
            state.checkins.push((std::time::Instant::now(), checkin));
            match &state.desired {
                Some(desired) if Some(&desired.etag) != etag.as_ref() => {
                    (200, serde_json::to_vec(desired).unwrap())
                }
                _ => (204, Vec::new()),
            }
        }
        ("POST", "/device/v1/reports") => {
            if let Err(refused) = authorised(state, request) {
                return refused;
            }
            if let Some(status) = state.refuse_reports_with {
                return error(status, "refused_for_the_test");
            }
            let Ok(batch) = serde_json::from_slice::<ReportBatch>(&request.body) else {
                return error(400, "invalid_json");
            };
            let acked = batch.reports.last().map_or(0, |r| r.seq);
            state.reports.extend(batch.reports);
            (
                200,
                serde_json::to_vec(&ReportAck {
                    acked_through: acked,
                })
                .unwrap(),
            )
        }
        _ => error(404, "not_found"),
    }
}

async fn serve_artifact(
    stream: &mut TcpStream,
    state: &Arc<Mutex<HubState>>,
    request: &Request,
) -> std::io::Result<()> {
    let (status, headers, body, cut) = artifact_answer(&mut state.lock().unwrap(), request);
    respond(stream, status, &headers, &body, cut).await
}

type Answer = (u16, Vec<(&'static str, String)>, Vec<u8>, Option<usize>);

fn artifact_answer(state: &mut HubState, request: &Request) -> Answer {
    if let Err((status, body)) = authorised(state, request) {
        return (status, Vec::new(), body, None);
    }
    let sha = request
        .path
        .trim_start_matches("/device/v1/artifacts/")
        .to_string();
    let range = request.headers.get("range").cloned();
    state.artifact_ranges.push(range.clone());
    let cut = state.cut_next_download_after.take();
    let Some(bytes) = state.artifacts.get(&sha).cloned() else {
        let (status, body) = error(404, "not_found");
        return (status, Vec::new(), body, None);
    };
    let etag = format!("\"{sha}\"");
    let if_range_ok = request.headers.get("if-range").is_none_or(|v| *v == etag);
    let start = range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|n| n.parse::<usize>().ok())
        .filter(|_| if_range_ok);
    let mut headers = vec![("ETag", etag)];
    match start {
        Some(start) if start >= bytes.len() => {
            headers.push(("Content-Range", format!("bytes */{}", bytes.len())));
            (416, headers, Vec::new(), None)
        }
        Some(start) => {
            headers.push((
                "Content-Range",
                format!("bytes {start}-{}/{}", bytes.len() - 1, bytes.len()),
            ));
            (206, headers, bytes[start..].to_vec(), cut)
        }
        None => (200, headers, bytes, cut),
    }
}
