//! Enrolment, check-ins, downloads, reports and device credentials.

use super::*;

pub(crate) async fn enrolment_accepted_and_pending(hub: &TestHub) {
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

pub(crate) async fn checkin_answers_204_until_something_changes(hub: &TestHub) {
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

pub(crate) async fn artifacts_download_with_ranges_and_only_to_their_fleet(hub: &TestHub) {
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

pub(crate) fn report(seq: u64, state: ReportState, output: Option<&str>) -> UpdateReport {
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

pub(crate) async fn reports_are_stored_once_and_shown_to_operators(hub: &TestHub) {
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

pub(crate) async fn requests_without_or_with_wrong_credentials_are_refused(hub: &TestHub) {
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
