//! The hub's HTTP APIs driven over real sockets against a real hub, on SQLite always and on
//! PostgreSQL when `DROVER_TEST_POSTGRES_URL` is set. The device side here is a small client
//! written from docs/protocol.md, not the agent, so that the protocol itself is what is tested.

#![allow(clippy::unwrap_used, reason = "a panic is how a test fails")]

use drover_protocol::device::{
    CheckinRequest, DesiredState, EnrollRequest, Facts, Module, ReportBatch, ReportState,
    UpdateReport, UpdateStatus,
};
use drover_protocol::signing::{ReleaseSigningKey, enrolment_message};
use drover_test_support::{Api, Engine, TestHub, tar_gz, wait_until, zip};
use serde_json::{Value, json};
use std::time::Duration;

/// A device written from the protocol description.
struct TestDevice {
    http: reqwest::Client,
    base: String,
    key: ReleaseSigningKey,
    id: String,
    credential: String,
}

impl TestDevice {
    async fn enroll(hub: &TestHub, provisioning_key: &str) -> (u16, Value, TestDevice) {
        let key = ReleaseSigningKey::generate();
        let mut device = TestDevice {
            http: reqwest::Client::new(),
            base: hub.url.clone(),
            key,
            id: String::new(),
            credential: String::new(),
        };
        let (status, body) = device.enroll_again(provisioning_key).await;
        (status, body, device)
    }

    async fn enroll_again(&mut self, provisioning_key: &str) -> (u16, Value) {
        let public_key = self.key.public().to_string();
        let req = EnrollRequest {
            protocol: 1,
            provisioning_key: provisioning_key.into(),
            proof: self.key.sign_raw(&enrolment_message(&public_key, "rpi4")),
            public_key,
            device_type: "rpi4".into(),
            agent_version: "0.1.0".into(),
            facts: Facts {
                os: "Debian 12".into(),
                arch: "aarch64".into(),
                tags: vec!["shop".into()],
                ..Facts::default()
            },
        };
        let response = self
            .http
            .post(format!("{}/device/v1/enroll", self.base))
            .json(&req)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let body: Value = response.json().await.unwrap();
        if status == 200 {
            self.id = body["device_id"].as_str().unwrap().to_string();
            self.credential = body["credential"].as_str().unwrap().to_string();
        }
        (status, body)
    }

    async fn checkin(&self, etag: Option<&str>, current: Option<&str>) -> (u16, Value) {
        let req = CheckinRequest {
            protocol: 1,
            desired_etag: etag.map(String::from),
            current_release: current.map(String::from),
            agent_version: "0.1.0".into(),
            update: UpdateStatus::idle(),
            facts: None,
        };
        let response = self
            .http
            .post(format!("{}/device/v1/checkin", self.base))
            .bearer_auth(&self.credential)
            .json(&req)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    async fn desired(&self) -> DesiredState {
        let (status, body) = self.checkin(None, None).await;
        assert_eq!(status, 200, "{body}");
        serde_json::from_value(body).unwrap()
    }

    async fn report(&self, reports: Vec<UpdateReport>) -> (u16, Value) {
        let response = self
            .http
            .post(format!("{}/device/v1/reports", self.base))
            .bearer_auth(&self.credential)
            .json(&ReportBatch {
                protocol: 1,
                reports,
            })
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    async fn download(&self, path: &str, range: Option<&str>) -> reqwest::Response {
        let mut request = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.credential);
        if let Some(range) = range {
            request = request.header("range", range);
        }
        request.send().await.unwrap()
    }
}

fn app_archive(version: &str) -> Vec<u8> {
    tar_gz(&[("app/VERSION", version.as_bytes(), 0o644)])
}

macro_rules! both_engines {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $case() {
                    let hub = drover_test_support::TestHub::start(drover_test_support::Engine::Sqlite)
                        .await
                        .unwrap()
                        .unwrap();
                    super::$case(&hub).await;
                    hub.stop().await.unwrap();
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $case() {
                    let Some(hub) = drover_test_support::TestHub::start(drover_test_support::Engine::Postgres)
                        .await
                        .unwrap() else { return };
                    super::$case(&hub).await;
                    hub.stop().await.unwrap();
                }
            )*
        }
    };
}

both_engines!(
    enrolment_accepted_and_pending,
    checkin_answers_204_until_something_changes,
    artifacts_download_with_ranges_and_only_to_their_fleet,
    reports_are_stored_once_and_shown_to_operators,
    requests_without_or_with_wrong_credentials_are_refused,
    bad_input_gets_clear_4xx_bodies,
    releases_must_be_signed_with_the_fleet_key,
    organizations_cannot_see_each_other,
    seed_protocol_devices_update_and_report,
    presence_and_fleet_status_follow_checkins,
);

async fn enrolment_accepted_and_pending(hub: &TestHub) {
    let api = hub.api();
    let (open_key, _) = api.create_fleet("open", true, 60).await.unwrap();
    let (closed_key, _) = api.create_fleet("closed", false, 60).await.unwrap();

    let (status, body, open) = TestDevice::enroll(hub, &open_key).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "accepted");
    assert_eq!(body["fleet"], "open");
    assert_eq!(open.id.len(), 10);
    assert!(open.credential.starts_with("drv_d_"));
    assert_eq!(open.checkin(None, None).await.0, 200);

    let (status, body, mut pending) = TestDevice::enroll(hub, &closed_key).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "pending");
    let (status, body) = pending.checkin(None, None).await;
    assert_eq!(status, 403);
    assert_eq!(body["error"], "device_pending");
    let (_, listed) = api.get("/api/v1/devices?status=pending").await.unwrap();
    assert_eq!(listed[0]["id"], pending.id.as_str());
    let (status, body) = api
        .post(&format!("/api/v1/devices/{}/accept", pending.id), json!({}))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(pending.checkin(None, None).await.0, 200);

    // Enrolling again with the same key (the answer was lost): same ID, new credential, and
    // the old credential stops working.
    let old = pending.credential.clone();
    let id = pending.id.clone();
    let (status, _) = pending.enroll_again(&closed_key).await;
    assert_eq!(status, 200);
    assert_eq!(pending.id, id);
    assert_ne!(pending.credential, old);
    assert_eq!(pending.checkin(None, None).await.0, 200);
    let stale = TestDevice {
        http: reqwest::Client::new(),
        base: hub.url.clone(),
        key: ReleaseSigningKey::generate(),
        id: id.clone(),
        credential: old,
    };
    assert_eq!(stale.checkin(None, None).await.0, 401);

    let (status, body, _) = TestDevice::enroll(hub, "drv_p_not-a-key").await;
    assert_eq!(status, 401);
    assert_eq!(body["error"], "invalid_provisioning_key");
}

async fn checkin_answers_204_until_something_changes(hub: &TestHub) {
    let api = hub.api();
    let (pk, key) = api.create_fleet("solar", true, 30).await.unwrap();
    let (_, _, device) = TestDevice::enroll(hub, &pk).await;
    let desired = device.desired().await;
    assert_eq!(desired.poll_interval_s, 30);
    assert_eq!(desired.release, None);
    assert_eq!(device.checkin(Some(&desired.etag), None).await.0, 204);

    let artifact = app_archive("1.0");
    api.create_release("solar", "1.0", Module::App, &artifact, &key)
        .await
        .unwrap();
    // A release that is not deployed changes nothing.
    assert_eq!(device.checkin(Some(&desired.etag), None).await.0, 204);
    api.deploy("solar", "1.0").await.unwrap();
    let (status, body) = device.checkin(Some(&desired.etag), None).await;
    assert_eq!(status, 200, "{body}");
    let desired: DesiredState = serde_json::from_value(body).unwrap();
    let offer = desired.release.clone().unwrap();
    assert_eq!(offer.version, "1.0");
    assert_eq!(offer.module, Module::App);
    assert_eq!(offer.size, artifact.len() as u64);
    offer
        .manifest()
        .verify(&key.public(), &offer.signature)
        .unwrap();
    assert_eq!(
        device.checkin(Some(&desired.etag), Some("1.0")).await.0,
        204
    );

    // Config and poll interval changes reach the device too.
    let (status, _) = api
        .patch(
            "/api/v1/fleets/solar",
            json!({"config": {"meter": {"name": "m1"}}, "poll_interval_s": 5}),
        )
        .await
        .unwrap();
    assert_eq!(status, 200);
    let (status, body) = device
        .patch_device_config(&api, json!({"meter": {"slot": 2}}))
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = device.checkin(Some(&desired.etag), Some("1.0")).await;
    assert_eq!(status, 200);
    assert_eq!(body["poll_interval_s"], 5);
    assert_eq!(body["config"], json!({"meter": {"name": "m1", "slot": 2}}));
}

impl TestDevice {
    async fn patch_device_config(&self, api: &Api, config: Value) -> (u16, Value) {
        api.patch(
            &format!("/api/v1/devices/{}", self.id),
            json!({ "config": config }),
        )
        .await
        .unwrap()
    }
}

async fn artifacts_download_with_ranges_and_only_to_their_fleet(hub: &TestHub) {
    let api = hub.api();
    let (pk, key) = api.create_fleet("solar", true, 60).await.unwrap();
    let (other_pk, _) = api.create_fleet("wind", true, 60).await.unwrap();
    let (_, _, device) = TestDevice::enroll(hub, &pk).await;
    let (_, _, outsider) = TestDevice::enroll(hub, &other_pk).await;
    let artifact = app_archive(&"x".repeat(5000));
    api.create_release("solar", "1.0", Module::App, &artifact, &key)
        .await
        .unwrap();
    api.deploy("solar", "1.0").await.unwrap();
    let url = device.desired().await.release.unwrap().artifact_url;

    let full = device.download(&url, None).await;
    assert_eq!(full.status(), 200);
    let etag = full.headers()["etag"].to_str().unwrap().to_string();
    assert_eq!(full.bytes().await.unwrap().as_ref(), artifact.as_slice());

    let part = device.download(&url, Some("bytes=100-")).await;
    assert_eq!(part.status(), 206);
    assert_eq!(
        part.headers()["content-range"].to_str().unwrap(),
        format!("bytes 100-{}/{}", artifact.len() - 1, artifact.len())
    );
    assert_eq!(part.bytes().await.unwrap().as_ref(), &artifact[100..]);

    let past = device
        .download(&url, Some(&format!("bytes={}-", artifact.len())))
        .await;
    assert_eq!(past.status(), 416);

    let cached = device
        .http
        .get(format!("{}{url}", hub.url))
        .bearer_auth(&device.credential)
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(cached.status(), 304);

    assert_eq!(outsider.download(&url, None).await.status(), 404);
    let anonymous = reqwest::Client::new()
        .get(format!("{}{url}", hub.url))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);
}

fn report(seq: u64, state: ReportState, output: Option<&str>) -> UpdateReport {
    UpdateReport {
        seq,
        at_ms: 1_700_000_000_000 + i64::try_from(seq).unwrap(),
        release: "1.0".into(),
        attempt: 1,
        state,
        message: Some(format!("{state:?}")),
        output: output.map(String::from),
    }
}

async fn reports_are_stored_once_and_shown_to_operators(hub: &TestHub) {
    let api = hub.api();
    let (pk, _) = api.create_fleet("solar", true, 60).await.unwrap();
    let (_, _, device) = TestDevice::enroll(hub, &pk).await;
    let batch = vec![
        report(1, ReportState::Downloading, None),
        report(2, ReportState::Installing, None),
        report(
            3,
            ReportState::Failure,
            Some("update.sh: line 3: npm: not found"),
        ),
    ];
    let (status, body) = device.report(batch.clone()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["acked_through"], 3);
    let (status, body) = device.report(batch).await;
    assert_eq!((status, body["acked_through"].clone()), (200, json!(3)));
    let (status, attempts) = api
        .get(&format!("/api/v1/devices/{}/attempts", device.id))
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(attempts.as_array().unwrap().len(), 1);
    assert_eq!(attempts[0]["state"], "failure");
    assert_eq!(attempts[0]["output"], "update.sh: line 3: npm: not found");
    assert_eq!(attempts[0]["events"].as_array().unwrap().len(), 3);

    let huge = "x".repeat(drover_protocol::MAX_OUTPUT_BYTES + 1);
    let (status, body) = device
        .report(vec![report(4, ReportState::Failure, Some(&huge))])
        .await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["error"], "report_too_large");
}

async fn requests_without_or_with_wrong_credentials_are_refused(hub: &TestHub) {
    let api = hub.api();
    let (pk, _) = api.create_fleet("solar", true, 60).await.unwrap();
    let (_, _, device) = TestDevice::enroll(hub, &pk).await;
    let http = reqwest::Client::new();

    let response = http
        .get(format!("{}/api/v1/fleets", hub.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "missing_token");

    let wrong = Api::new(&hub.url, "drv_o_wrong");
    let (status, body) = wrong.get("/api/v1/fleets").await.unwrap();
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("invalid_token"))
    );

    // A device credential is not an operator token, and the other way round.
    let as_device = Api::new(&hub.url, &device.credential);
    assert_eq!(as_device.get("/api/v1/fleets").await.unwrap().0, 401);
    let as_operator = TestDevice {
        http: http.clone(),
        base: hub.url.clone(),
        key: ReleaseSigningKey::generate(),
        id: String::new(),
        credential: hub.token.clone(),
    };
    assert_eq!(as_operator.checkin(None, None).await.0, 401);
    let unknown = TestDevice {
        credential: "drv_d_unknown".into(),
        ..as_operator
    };
    let (status, body) = unknown.checkin(None, None).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("invalid_credential"))
    );

    let (status, _) = api
        .post(&format!("/api/v1/devices/{}/revoke", device.id), json!({}))
        .await
        .unwrap();
    assert_eq!(status, 200);
    let (status, body) = device.checkin(None, None).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("device_revoked"))
    );
    let (status, body) = TestDevice {
        http,
        base: hub.url.clone(),
        key: ReleaseSigningKey::from_text(&device.key.to_text()).unwrap(),
        id: String::new(),
        credential: String::new(),
    }
    .enroll_again(&pk)
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("device_revoked"))
    );
}

async fn bad_input_gets_clear_4xx_bodies(hub: &TestHub) {
    let api = hub.api();
    let http = reqwest::Client::new();
    let post_raw = |path: &str, body: &'static str| {
        http.post(format!("{}{path}", hub.url))
            .bearer_auth(&hub.token)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let response = post_raw("/api/v1/fleets", "{not json").await.unwrap();
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "invalid_json");
    assert!(body["message"].as_str().unwrap().contains("JSON"));

    let response = post_raw("/api/v1/fleets", r#"{"nmae": "x"}"#)
        .await
        .unwrap();
    assert_eq!(response.status(), 422);
    let body: Value = response.json().await.unwrap();
    assert!(body["message"].as_str().unwrap().contains("nmae"), "{body}");

    let (status, body) = api
        .post("/api/v1/fleets", json!({"name": "has space"}))
        .await
        .unwrap();
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_name"))
    );

    let big = format!(r#"{{"name": "{}"}}"#, "x".repeat(2 << 20));
    let response = http
        .post(format!("{}/api/v1/fleets", hub.url))
        .bearer_auth(&hub.token)
        .header("content-type", "application/json")
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "body_too_large");

    let data = vec![7u8; 1000];
    let sha = drover_protocol::ids::sha256_hex(&data);
    let (status, body) = api
        .put_bytes(
            &format!("/api/v1/artifacts/{}", "0".repeat(64)),
            data.clone(),
        )
        .await
        .unwrap();
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("hash_mismatch"))
    );
    let (status, body) = api
        .put_bytes("/api/v1/artifacts/not-a-hash", data.clone())
        .await
        .unwrap();
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_sha256"))
    );
    let (status, _) = api
        .put_bytes(&format!("/api/v1/artifacts/{sha}"), data)
        .await
        .unwrap();
    assert_eq!(status, 201);

    let (status, body) = api.get("/api/v1/nothing-here").await.unwrap();
    assert_eq!((status, body["error"].as_str()), (404, Some("no_route")));
    let (status, body) = api
        .call(reqwest::Method::DELETE, "/api/v1/fleets", None)
        .await
        .unwrap();
    assert_eq!(
        (status, body["error"].as_str()),
        (405, Some("method_not_allowed"))
    );
    let (status, body) = api.get("/api/v1/devices?status=lost").await.unwrap();
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_status"))
    );
    let (status, body) = api.get("/api/v1/devices/has%20space").await.unwrap();
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_device_id"))
    );
}

#[tokio::test]
async fn oversized_artifacts_are_refused_and_nothing_is_kept() {
    let hub = TestHub::start_with(Engine::Sqlite, |c| c.max_artifact_bytes = 10_000)
        .await
        .unwrap()
        .unwrap();
    let api = hub.api();
    let data = vec![1u8; 20_000];
    let sha = drover_protocol::ids::sha256_hex(&data);
    let (status, body) = api
        .put_bytes(&format!("/api/v1/artifacts/{sha}"), data)
        .await
        .unwrap();
    assert_eq!(
        (status, body["error"].as_str()),
        (413, Some("artifact_too_large"))
    );
    // Without a Content-Length (streamed), the limit holds as well.
    let stream =
        futures_util::stream::iter((0..20).map(|_| Ok::<_, std::io::Error>(vec![1u8; 1000])));
    let response = api
        .client
        .put(format!("{}/api/v1/artifacts/{sha}", hub.url))
        .bearer_auth(&hub.token)
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    let (status, _) = api.get(&format!("/api/v1/artifacts/{sha}")).await.unwrap();
    assert_eq!(status, 404);
    let tmp = std::fs::read_dir(hub.data_dir.join("artifacts/tmp"))
        .unwrap()
        .count();
    assert_eq!(tmp, 0);
    hub.stop().await.unwrap();
}

async fn releases_must_be_signed_with_the_fleet_key(hub: &TestHub) {
    let api = hub.api();
    let (_, key) = api.create_fleet("solar", true, 60).await.unwrap();
    let (status, _) = api
        .post("/api/v1/fleets", json!({"name": "unkeyed"}))
        .await
        .unwrap();
    assert_eq!(status, 201);
    let artifact = app_archive("1.0");
    let sha = drover_protocol::ids::sha256_hex(&artifact);
    api.put_bytes(&format!("/api/v1/artifacts/{sha}"), artifact.clone())
        .await
        .unwrap();
    let wrong_key = ReleaseSigningKey::generate();
    let manifest = drover_protocol::signing::ReleaseManifest {
        version: "1.0",
        module: Module::App,
        device_type: None,
        sha256: &sha,
        size: artifact.len() as u64,
    };
    let body = |sig: String, version: &str, module: &str| json!({"version": version, "module": module, "sha256": sha, "signature": sig});
    let (status, resp) = api
        .post(
            "/api/v1/fleets/solar/releases",
            body(manifest.sign(&wrong_key), "1.0", "app"),
        )
        .await
        .unwrap();
    assert_eq!(
        (status, resp["error"].as_str()),
        (400, Some("invalid_signature"))
    );
    // A valid signature for version 1.0 does not cover 2.0.
    let (status, resp) = api
        .post(
            "/api/v1/fleets/solar/releases",
            body(manifest.sign(&key), "2.0", "app"),
        )
        .await
        .unwrap();
    assert_eq!(
        (status, resp["error"].as_str()),
        (400, Some("invalid_signature"))
    );
    let (status, resp) = api
        .post(
            "/api/v1/fleets/unkeyed/releases",
            body(manifest.sign(&key), "1.0", "app"),
        )
        .await
        .unwrap();
    assert_eq!(
        (status, resp["error"].as_str()),
        (400, Some("no_release_key"))
    );
    let (status, resp) = api
        .post(
            "/api/v1/fleets/solar/releases",
            body(manifest.sign(&key), "1.0", "firmware"),
        )
        .await
        .unwrap();
    assert_eq!(
        (status, resp["error"].as_str()),
        (400, Some("invalid_module"))
    );
    let (status, resp) = api
        .post(
            "/api/v1/fleets/solar/releases",
            body(manifest.sign(&key), "1.0", "app"),
        )
        .await
        .unwrap();
    assert_eq!(status, 201, "{resp}");
    assert_eq!(resp["seq"], 1);
    let (status, resp) = api
        .post(
            "/api/v1/fleets/solar/releases",
            body(manifest.sign(&key), "1.0", "app"),
        )
        .await
        .unwrap();
    assert_eq!((status, resp["error"].as_str()), (409, Some("conflict")));

    let script = b"#!/bin/sh\necho hi\n".to_vec();
    let sha = drover_protocol::ids::sha256_hex(&script);
    api.put_bytes(&format!("/api/v1/artifacts/{sha}"), script.clone())
        .await
        .unwrap();
    let manifest = drover_protocol::signing::ReleaseManifest {
        version: "2.0",
        module: Module::App,
        device_type: None,
        sha256: &sha,
        size: script.len() as u64,
    };
    let (status, resp) = api
        .post(
            "/api/v1/fleets/solar/releases",
            json!({"version": "2.0", "module": "app", "sha256": sha, "signature": manifest.sign(&key)}),
        )
        .await
        .unwrap();
    assert_eq!(
        (status, resp["error"].as_str()),
        (400, Some("wrong_format"))
    );
    let (status, resp) = api
        .post(
            "/api/v1/fleets/solar/releases",
            json!({"version": "3.0", "module": "app", "sha256": "e".repeat(64), "signature": "x"}),
        )
        .await
        .unwrap();
    assert_eq!(
        (status, resp["error"].as_str()),
        (400, Some("artifact_missing"))
    );
}

async fn organizations_cannot_see_each_other(hub: &TestHub) {
    let api = hub.api();
    let (pk, key) = api.create_fleet("solar", true, 60).await.unwrap();
    let (_, _, device) = TestDevice::enroll(hub, &pk).await;
    let artifact = app_archive("1.0");
    api.create_release("solar", "1.0", Module::App, &artifact, &key)
        .await
        .unwrap();
    api.deploy("solar", "1.0").await.unwrap();

    let store = &hub.hub.state.store;
    let other = store.create_org("rival").await.unwrap();
    let (_, token) = store
        .create_api_token(other.id, "admin", "admin")
        .await
        .unwrap();
    let rival = Api::new(&hub.url, &token);
    let (status, fleets) = rival.get("/api/v1/fleets").await.unwrap();
    assert_eq!((status, fleets), (200, json!([])));
    let (status, devices) = rival.get("/api/v1/devices").await.unwrap();
    assert_eq!((status, devices), (200, json!([])));
    for path in [
        "/api/v1/fleets/solar".to_string(),
        "/api/v1/fleets/solar/releases".to_string(),
        "/api/v1/fleets/solar/status".to_string(),
        format!("/api/v1/devices/{}", device.id),
        format!("/api/v1/devices/{}/attempts", device.id),
        format!(
            "/api/v1/artifacts/{}",
            drover_protocol::ids::sha256_hex(&artifact)
        ),
    ] {
        let (status, body) = rival.get(&path).await.unwrap();
        assert_eq!(status, 404, "{path}: {body}");
    }
    let (status, _) = rival
        .post(&format!("/api/v1/devices/{}/revoke", device.id), json!({}))
        .await
        .unwrap();
    assert_eq!(status, 404);
    let (status, _) = rival
        .post("/api/v1/fleets/solar/deploy", json!({"release": "1.0"}))
        .await
        .unwrap();
    assert_eq!(status, 404);
    // The same fleet name in the other organization is a different fleet.
    let (rival_pk, _) = rival.create_fleet("solar", true, 60).await.unwrap();
    let (_, _, rival_device) = TestDevice::enroll(hub, &rival_pk).await;
    let url = device.desired().await.release.unwrap().artifact_url;
    assert_eq!(rival_device.download(&url, None).await.status(), 404);
    let (_, mine) = api.get("/api/v1/devices").await.unwrap();
    assert_eq!(mine.as_array().unwrap().len(), 1);
    assert_eq!(device.checkin(None, None).await.0, 200);
}

async fn seed_protocol_devices_update_and_report(hub: &TestHub) {
    let api = hub.api();
    let (_, key) = api.create_fleet("legacy", false, 15).await.unwrap();
    let (status, fleet) = api
        .patch(
            "/api/v1/fleets/legacy",
            json!({"seed_protocol": true, "config": {"meter": {"meterName": "123456"}}}),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{fleet}");
    let base = format!("{}{}", hub.url, fleet["seed_base_path"].as_str().unwrap());
    let http = reqwest::Client::new();
    let updateme = |device: &'static str, snapshot: &str| {
        http.get(format!("{base}/updateme"))
            .query(&[
                ("deviceId", device),
                ("snapshotId", snapshot),
                ("updaterVersion", "v1.20.3"),
            ])
            .send()
    };
    let answer: Value = updateme("seedbox01", "0")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        answer,
        json!({"status": "noUpdateNeeded", "updateInterval": 15})
    );
    let (_, pending) = api
        .get("/api/v1/devices?fleet=legacy&status=pending")
        .await
        .unwrap();
    assert_eq!(pending[0]["id"], "seedbox01");
    assert_eq!(pending[0]["protocol"], "seed");
    assert_eq!(pending[0]["agent_version"], "v1.20.3");
    api.post("/api/v1/devices/seedbox01/accept", json!({}))
        .await
        .unwrap();

    let update = zip(&[("pkg/update.sh", b"#!/bin/sh\necho updated\n", 0o755)]);
    api.create_release("legacy", "1.0", Module::Script, &update, &key)
        .await
        .unwrap();
    api.deploy("legacy", "1.0").await.unwrap();
    let answer: Value = updateme("seedbox01", "0")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["status"], "updateNeeded");
    assert_eq!(answer["snapshotId"], "1");
    assert_eq!(answer["downloadType"], "zip");
    assert_eq!(answer["updateInterval"], 15);
    assert_eq!(answer["config"], json!({"meter": {"meterName": "123456"}}));
    let download_url = answer["downloadUrl"].as_str().unwrap();
    assert!(download_url.starts_with("http://"), "{download_url}");
    let bytes = http
        .get(download_url)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(bytes.as_ref(), update.as_slice());

    // A failure (success arrives as the string "false") is recorded with its output, and the
    // hub backs off instead of re-offering the update on the very next poll.
    let outcome = json!({"deviceId": "seedbox01", "snapshotId": "1", "success": "false", "output": "npm ERR! 404"});
    let response = http
        .post(format!("{base}/howitworkedout"))
        .json(&outcome)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.json::<Value>().await.unwrap(),
        json!({"status": "ok"})
    );
    let answer: Value = updateme("seedbox01", "0")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        answer["status"], "noUpdateNeeded",
        "backing off after a failure"
    );
    let (_, device) = api.get("/api/v1/devices/seedbox01").await.unwrap();
    assert_eq!(device["update"]["phase"], "backing_off");

    // An operator retry clears the backoff; this time it works.
    api.post("/api/v1/devices/seedbox01/retry", json!({}))
        .await
        .unwrap();
    let answer: Value = updateme("seedbox01", "0")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["status"], "updateNeeded");
    let outcome =
        json!({"deviceId": "seedbox01", "snapshotId": "1", "success": "true", "output": "updated"});
    http.post(format!("{base}/howitworkedout"))
        .json(&outcome)
        .send()
        .await
        .unwrap();
    let answer: Value = updateme("seedbox01", "1")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["status"], "noUpdateNeeded");
    let (_, device) = api.get("/api/v1/devices/seedbox01").await.unwrap();
    assert_eq!(device["current_release"], "1.0");
    assert_eq!(device["seed_snapshot"], 1);
    let (_, attempts) = api.get("/api/v1/devices/seedbox01/attempts").await.unwrap();
    assert_eq!(attempts[0]["state"], "success");
    assert_eq!(attempts[1]["state"], "failure");
    assert_eq!(attempts[1]["output"], "npm ERR! 404");

    let time: Value = http
        .get(format!("{base}/time"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let data = time["data"].as_str().unwrap();
    assert_eq!(data.len(), 24, "{data}");
    assert!(data.ends_with('Z') && data.as_bytes()[10] == b'T', "{data}");

    let bad = http
        .post(format!("{base}/howitworkedout"))
        .json(&json!({"deviceId": "seedbox01", "snapshotId": "1", "success": "maybe"}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 422);
    api.patch("/api/v1/fleets/legacy", json!({"seed_protocol": false}))
        .await
        .unwrap();
    let gone = updateme("seedbox01", "1").await.unwrap();
    assert_eq!(gone.status(), 404);
}

async fn presence_and_fleet_status_follow_checkins(hub: &TestHub) {
    let api = hub.api();
    let (pk, key) = api.create_fleet("solar", true, 60).await.unwrap();
    let (_, _, a) = TestDevice::enroll(hub, &pk).await;
    let (_, _, b) = TestDevice::enroll(hub, &pk).await;
    api.create_release("solar", "1.0", Module::App, &app_archive("1"), &key)
        .await
        .unwrap();
    api.deploy("solar", "1.0").await.unwrap();
    a.checkin(None, Some("1.0")).await;
    b.checkin(None, None).await;
    let (_, status) = api.get("/api/v1/fleets/solar/status").await.unwrap();
    assert_eq!(status["accepted"], 2);
    assert_eq!(status["up_to_date"], 1);
    assert_eq!(status["converged"], false);
    b.checkin(None, Some("1.0")).await;
    let (_, status) = api.get("/api/v1/fleets/solar/status").await.unwrap();
    assert_eq!(status["converged"], true);
    // Last-seen times are written in batches; they reach the database shortly.
    wait_until(
        Duration::from_secs(10),
        "last_seen in the database",
        || async {
            let (_, status) = api.get("/api/v1/fleets/solar/status").await.unwrap();
            (status["online"] == 2).then_some(())
        },
    )
    .await;
    let (_, device) = api.get(&format!("/api/v1/devices/{}", a.id)).await.unwrap();
    assert_eq!(device["online"], true);
    assert_eq!(device["remote_ip"], "127.0.0.1");
    assert_eq!(device["facts"]["os"], "Debian 12");
}

#[tokio::test]
async fn the_openapi_document_names_every_route() {
    let hub = TestHub::start(Engine::Sqlite).await.unwrap().unwrap();
    let api = hub.api();
    let (status, doc) = api.get("/api/v1/openapi.json").await.unwrap();
    assert_eq!(status, 200);
    let paths = doc["paths"].as_object().unwrap();
    assert!(paths.len() >= 20, "only {} paths documented", paths.len());
    for (path, item) in paths {
        for method in item.as_object().unwrap().keys() {
            if !["get", "post", "put", "patch", "delete"].contains(&method.as_str()) {
                continue;
            }
            let concrete = path
                .replace("{sha256}", &"0".repeat(64))
                .replace("{secret}", "nosuchsecret")
                .replace("{id}", "nosuchdevice")
                .replace("{fleet}", "nosuchfleet")
                .replace("{version}", "1.0");
            let (status, body) = api
                .call(
                    method.to_uppercase().parse().unwrap(),
                    &concrete,
                    Some(json!({})),
                )
                .await
                .unwrap();
            assert!(
                body["error"] != "no_route" && body["error"] != "method_not_allowed",
                "{method} {path} is documented but not routed: {status} {body}"
            );
        }
    }
    hub.stop().await.unwrap();
}
