//! A bare device written from the protocol, for tests that need data or a credential without
//! running an agent.

use drover_protocol::batch::{self, Batch};
use drover_protocol::device::{EnrollRequest, Facts};
use drover_protocol::ids::DeviceId;
use drover_protocol::reading::Reading;
use drover_protocol::signing::{ReleaseSigningKey, enrolment_message};

/// An enrolled device.
#[derive(Debug, Clone)]
pub struct BareDevice {
    /// The hub's URL.
    pub hub: String,
    /// Its ID.
    pub id: DeviceId,
    /// Its credential.
    pub credential: String,
}

impl BareDevice {
    /// Enrols a new device with a provisioning key (device type `test`).
    pub async fn enroll(hub: &str, provisioning_key: &str) -> anyhow::Result<BareDevice> {
        crate::install_crypto();
        let key = ReleaseSigningKey::generate();
        let public_key = key.public().to_string();
        let request = EnrollRequest {
            protocol: drover_protocol::PROTOCOL_VERSION,
            provisioning_key: provisioning_key.into(),
            proof: key.sign_raw(&enrolment_message(&public_key, "test")),
            public_key,
            device_type: "test".into(),
            agent_version: "test".into(),
            facts: Facts::default(),
        };
        let answer: serde_json::Value = reqwest::Client::new()
            .post(format!("{hub}/device/v1/enroll"))
            .json(&request)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let id = answer["device_id"].as_str().unwrap_or_default();
        Ok(BareDevice {
            hub: hub.to_string(),
            id: DeviceId::parse(id)?,
            credential: answer["credential"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        })
    }

    /// Sends readings as batch `seq`; returns the HTTP status.
    pub async fn send(&self, seq: u64, readings: Vec<Reading>) -> anyhow::Result<u16> {
        let frame = batch::encode(&Batch {
            device: self.id.clone(),
            seq,
            readings,
        })?;
        let response = reqwest::Client::new()
            .post(format!("{}/device/v1/batches", self.hub))
            .bearer_auth(&self.credential)
            .header("content-type", batch::CONTENT_TYPE)
            .body(frame)
            .send()
            .await?;
        Ok(response.status().as_u16())
    }
}
