//! What operators see: organizations kept apart, the seed protocol, presence and status, the
//! OpenAPI document.

use super::*;

pub(crate) async fn organizations_cannot_see_each_other(hub: &TestHub) {
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

pub(crate) async fn seed_protocol_devices_update_and_report(hub: &TestHub) {
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

pub(crate) async fn presence_and_fleet_status_follow_checkins(hub: &TestHub) {
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
pub(crate) async fn the_openapi_document_names_every_route() {
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
                .replace("{site}", "nosuchsite")
                .replace("{version}", "1.0");
            // Only the status and an error body matter; a stream (the live feed) is
            // answered with its headers and never read to the end.
            let response = api
                .client
                .request(
                    method.to_uppercase().parse().unwrap(),
                    format!("{}{concrete}", hub.url),
                )
                .bearer_auth(&api.token)
                .json(&json!({}))
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            let streaming = response
                .headers()
                .get("content-type")
                .is_some_and(|t| t == "text/event-stream");
            let body: Value = if streaming {
                Value::Null
            } else {
                response.json().await.unwrap_or(Value::Null)
            };
            assert!(
                body["error"] != "no_route" && body["error"] != "method_not_allowed",
                "{method} {path} is documented but not routed: {status} {body}"
            );
        }
    }
    hub.stop().await.unwrap();
}

pub(crate) async fn sites_answer_who_has_this_box(hub: &TestHub) {
    let api = hub.api();
    let (pk, _) = api.create_fleet("solar", true, 60).await.unwrap();
    let (_, _, device) = TestDevice::enroll(hub, &pk).await;
    let (status, site) = api
        .post(
            "/api/v1/sites",
            json!({"name": "kristinas-house", "address": "Storgatan 1", "customer": "Kristina"}),
        )
        .await
        .unwrap();
    assert_eq!(status, 201, "{site}");
    let (status, body) = api
        .patch(
            &format!("/api/v1/devices/{}", device.id),
            json!({"site": "kristinas-house"}),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["site"], "kristinas-house");
    assert_eq!(body["customer"], "Kristina");
    let (_, sites) = api.get("/api/v1/sites?customer=Kristina").await.unwrap();
    assert_eq!(sites[0]["name"], "kristinas-house");
    let (status, body) = api
        .patch(
            &format!("/api/v1/devices/{}", device.id),
            json!({"site": "nowhere"}),
        )
        .await
        .unwrap();
    assert_eq!((status, body["error"].as_str()), (404, Some("not_found")));
    let (status, body) = api
        .post("/api/v1/sites", json!({"name": "kristinas-house"}))
        .await
        .unwrap();
    assert_eq!((status, body["error"].as_str()), (409, Some("conflict")));
    let (status, body) = api
        .patch(
            "/api/v1/sites/kristinas-house",
            json!({"customer": "K. Karlsson", "reporting_start": 1_700_000_000_000i64}),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["reporting_start"], 1_700_000_000_000i64);
    let (_, body) = api
        .get(&format!("/api/v1/devices/{}", device.id))
        .await
        .unwrap();
    assert_eq!(body["customer"], "K. Karlsson");
    let (status, _) = api
        .patch(
            &format!("/api/v1/devices/{}", device.id),
            json!({"site": ""}),
        )
        .await
        .unwrap();
    assert_eq!(status, 200);
    let (_, body) = api
        .get(&format!("/api/v1/devices/{}", device.id))
        .await
        .unwrap();
    assert_eq!(body["site"], serde_json::Value::Null);
}
