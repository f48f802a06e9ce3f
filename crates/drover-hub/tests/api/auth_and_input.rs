//! Bad input of every kind gets a clear 4xx, and releases must carry the fleet's signature.

use super::*;

pub(crate) async fn bad_input_gets_clear_4xx_bodies(hub: &TestHub) {
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
    // Numeric IDs that are not numbers get a JSON error, like everything else.
    for path in [
        "/api/v1/reports/abc",
        "/api/v1/reports/abc/csv",
        "/api/v1/series/1x/data",
    ] {
        let (status, body) = api.get(path).await.unwrap();
        assert_eq!(
            (status, body["error"].as_str()),
            (400, Some("invalid_path")),
            "{path}: {body}"
        );
    }
}

#[tokio::test]
pub(crate) async fn oversized_artifacts_are_refused_and_nothing_is_kept() {
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

pub(crate) async fn releases_must_be_signed_with_the_fleet_key(hub: &TestHub) {
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
