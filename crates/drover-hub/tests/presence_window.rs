//! Named after what broke: while a batch of last-seen
//! times is being written, `GET /api/v1/devices/{id}` shows the older database value (or none).

#![allow(clippy::unwrap_used, reason = "a panic is how a test fails")]

use drover_protocol::device::{CheckinRequest, EnrollRequest, Facts, UpdateStatus};
use drover_protocol::signing::{ReleaseSigningKey, enrolment_message};
use drover_test_support::{Engine, TestHub};

#[tokio::test]
async fn last_seen_does_not_go_back_while_a_presence_batch_is_written() {
    // The background flush runs only every ten minutes: the test plays its part by hand.
    let hub = TestHub::start_with(Engine::Sqlite, |c| c.presence_flush_ms = 600_000)
        .await
        .unwrap()
        .unwrap();
    let api = hub.api();
    let (provisioning_key, _) = api.create_fleet("f", true, 60).await.unwrap();
    let key = ReleaseSigningKey::generate();
    let public_key = key.public().to_string();
    let http = reqwest::Client::new();
    let enrolled: serde_json::Value = http
        .post(format!("{}/device/v1/enroll", hub.url))
        .json(&EnrollRequest {
            protocol: 1,
            provisioning_key,
            proof: key.sign_raw(&enrolment_message(&public_key, "rpi4")),
            public_key,
            device_type: "rpi4".into(),
            agent_version: "0.1.0".into(),
            facts: Facts::default(),
        })
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = enrolled["device_id"].as_str().unwrap();
    let credential = enrolled["credential"].as_str().unwrap();
    let status = http
        .post(format!("{}/device/v1/checkin", hub.url))
        .bearer_auth(credential)
        .json(&CheckinRequest {
            protocol: 1,
            desired_etag: None,
            current_release: None,
            agent_version: "0.1.0".into(),
            update: UpdateStatus::idle(),
            facts: None,
            telemetry: None,
        })
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 200);
    let last_seen = |body: serde_json::Value| body["last_seen"].as_i64();
    let (_, before) = api.get(&format!("/api/v1/devices/{id}")).await.unwrap();
    let seen = last_seen(before);
    assert!(seen.is_some(), "the check-in is visible while buffered");

    // What flush_presence does: drain the buffer, then write it in one transaction. An operator
    // asking in between must not see the device go back in time.
    let batch = hub.hub.state.presence.drain();
    let (_, during) = api.get(&format!("/api/v1/devices/{id}")).await.unwrap();
    hub.hub.state.store.flush_presence(&batch).await.unwrap();
    hub.hub.state.presence.written();
    let (_, after) = api.get(&format!("/api/v1/devices/{id}")).await.unwrap();
    assert_eq!(last_seen(after), seen);
    assert_eq!(
        last_seen(during),
        seen,
        "last_seen went back while the batch was written"
    );
}
