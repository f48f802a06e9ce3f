//! Simulated devices: each enrols over the real device API with its own identity key. For the
//! check-in benchmark it takes its desired state once, and from then on sends the no-change
//! check-in that a settled fleet sends all day; for the data benchmarks it sends telemetry
//! batches (`POST /device/v1/batches`) the way the agent's sender does.

use std::time::Duration;

use anyhow::{Context as _, bail};
use drover_protocol::PROTOCOL_VERSION;
use drover_protocol::batch;
use drover_protocol::device::{
    CheckinRequest, DesiredState, EnrollRequest, EnrollResponse, Facts, UpdateStatus,
};
use drover_protocol::signing::{ReleaseSigningKey, enrolment_message};
use reqwest::StatusCode;

use crate::hub::json_answer;

/// The device type the simulated devices report.
pub const DEVICE_TYPE: &str = "bench-x86_64";
/// The agent version the simulated devices report.
const AGENT_VERSION: &str = "bench";

/// An enrolled device that has its desired state: what it sends on each no-change check-in.
#[derive(Debug, Clone)]
pub struct SettledDevice {
    /// Its ID.
    pub id: String,
    /// Its bearer credential.
    pub credential: String,
    /// The check-in body naming the etag it holds (JSON).
    pub body: String,
}

/// A device that has enrolled: its ID and bearer credential.
#[derive(Debug, Clone)]
pub struct EnrolledDevice {
    /// Its ID.
    pub id: drover_protocol::ids::DeviceId,
    /// Its bearer credential.
    pub credential: String,
}

/// Enrols a new device with the fleet's provisioning key (the fleet must accept at once).
pub async fn enrol(
    http: &reqwest::Client,
    hub_url: &str,
    provisioning_key: &str,
) -> anyhow::Result<EnrolledDevice> {
    let identity = ReleaseSigningKey::generate();
    let public_key = identity.public().to_string();
    let request = EnrollRequest {
        protocol: PROTOCOL_VERSION,
        provisioning_key: provisioning_key.to_string(),
        proof: identity.sign_raw(&enrolment_message(&public_key, DEVICE_TYPE)),
        public_key,
        device_type: DEVICE_TYPE.to_string(),
        agent_version: AGENT_VERSION.to_string(),
        facts: Facts::default(),
    };
    let response = http
        .post(format!("{hub_url}/device/v1/enroll"))
        .json(&request)
        .send()
        .await
        .context("POST /device/v1/enroll")?;
    let enrolled: EnrollResponse = json_answer(response, "enrolling a device").await?;
    Ok(EnrolledDevice {
        id: enrolled.device_id,
        credential: enrolled.credential,
    })
}

/// Enrols a new device with the fleet's provisioning key, fetches its desired state, and checks
/// that the check-in it will send from then on is answered `204 No Content`.
pub async fn enrol_and_settle(
    http: &reqwest::Client,
    hub_url: &str,
    provisioning_key: &str,
) -> anyhow::Result<SettledDevice> {
    let enrolled = enrol(http, hub_url, provisioning_key).await?;
    let id = enrolled.id.to_string();

    let mut checkin = CheckinRequest {
        protocol: PROTOCOL_VERSION,
        desired_etag: None,
        current_release: None,
        agent_version: AGENT_VERSION.to_string(),
        update: UpdateStatus::idle(),
        facts: None,
        telemetry: None,
    };
    let (status, body) = send_checkin(http, hub_url, &enrolled.credential, &checkin).await?;
    if status != StatusCode::OK {
        bail!("device {id}'s first check-in was answered {status}, not 200 with its desired state");
    }
    let desired: DesiredState = serde_json::from_slice(&body)
        .with_context(|| format!("decoding device {id}'s desired state"))?;
    checkin.desired_etag = Some(desired.etag);
    let body = serde_json::to_string(&checkin).context("encoding a check-in")?;
    let settled = SettledDevice {
        id,
        credential: enrolled.credential,
        body,
    };
    expect_no_change(http, hub_url, &settled).await?;
    Ok(settled)
}

/// How many times a batch was refused with `503` before it was stored.
pub type Retries = u32;

/// Sends one encoded batch (`frame`) as the agent's sender does and waits until the hub has
/// stored it: `204` is the durable acknowledgement; on `503` (queue full) it waits
/// `Retry-After` seconds and sends the same batch again. Any other answer is an error.
pub async fn send_batch(
    http: &reqwest::Client,
    hub_url: &str,
    credential: &str,
    frame: &[u8],
) -> anyhow::Result<Retries> {
    let mut retries = 0;
    loop {
        let response = http
            .post(format!("{hub_url}/device/v1/batches"))
            .bearer_auth(credential)
            .header(reqwest::header::CONTENT_TYPE, batch::CONTENT_TYPE)
            .body(frame.to_vec())
            .send()
            .await
            .context("POST /device/v1/batches")?;
        let status = response.status();
        if status == StatusCode::NO_CONTENT {
            return Ok(retries);
        }
        if status == StatusCode::SERVICE_UNAVAILABLE && retries < MAX_RETRIES {
            let wait = response
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(1);
            retries += 1;
            tokio::time::sleep(Duration::from_secs(wait)).await;
            continue;
        }
        let body = response.text().await.unwrap_or_default();
        bail!("a batch was answered {status}, not 204: {body}");
    }
}

/// How often one batch may be refused as "queue full" before the benchmark gives up.
const MAX_RETRIES: Retries = 30;

/// Sends the device's no-change check-in and fails unless the hub answers `204`.
pub async fn expect_no_change(
    http: &reqwest::Client,
    url: &str,
    device: &SettledDevice,
) -> anyhow::Result<()> {
    let response = http
        .post(format!("{url}/device/v1/checkin"))
        .bearer_auth(&device.credential)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(device.body.clone())
        .send()
        .await
        .context("POST /device/v1/checkin")?;
    let status = response.status();
    if status != StatusCode::NO_CONTENT {
        let body = response.text().await.unwrap_or_default();
        bail!(
            "a no-change check-in of device {} to {url} was answered {status}, not 204: {body}",
            device.id
        );
    }
    Ok(())
}

async fn send_checkin(
    http: &reqwest::Client,
    hub_url: &str,
    credential: &str,
    checkin: &CheckinRequest,
) -> anyhow::Result<(StatusCode, Vec<u8>)> {
    let response = http
        .post(format!("{hub_url}/device/v1/checkin"))
        .bearer_auth(credential)
        .json(checkin)
        .send()
        .await
        .context("POST /device/v1/checkin")?;
    let status = response.status();
    let body = response
        .bytes()
        .await
        .context("reading a check-in answer")?;
    Ok((status, body.to_vec()))
}
