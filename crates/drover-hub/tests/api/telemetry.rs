//! Telemetry batches through the bridge, and the query API on what was stored.

use drover_protocol::batch::stream::StreamContext;
use drover_protocol::batch::{self, Batch, synthetic};
use drover_protocol::ids::DeviceId;
use drover_protocol::reading::Reading;

use super::*;

impl TestDevice {
    pub(crate) async fn send_batch(
        &self,
        frame: Vec<u8>,
    ) -> (u16, Value, reqwest::header::HeaderMap) {
        let response = self
            .http
            .post(format!("{}/device/v1/batches", self.base))
            .bearer_auth(&self.credential)
            .header("content-type", batch::CONTENT_TYPE)
            .body(frame)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let text = response.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::Null),
            headers,
        )
    }

    pub(crate) fn frame(&self, seq: u64, readings: Vec<Reading>) -> Vec<u8> {
        batch::encode(&Batch {
            device: DeviceId::parse(&self.id).unwrap(),
            seq,
            readings,
        })
        .unwrap()
    }
}

/// Two minutes of the synthetic 3-channel meter (60 polls at 2 s), starting at `poll`.
fn readings(polls: std::ops::Range<usize>) -> Vec<Reading> {
    let all = synthetic::solar_meter(11, polls.end);
    let start = synthetic::START_MS + polls.start as i64 * 2_000 - 5;
    all.into_iter().filter(|r| r.ts_ms >= start).collect()
}

pub(crate) async fn batches_are_stored_once_and_queryable(hub: &TestHub) {
    let api = hub.api();
    let (pk, _) = api.create_fleet("solar", true, 60).await.unwrap();
    let (_, _, device) = TestDevice::enroll(hub, &pk).await;
    let first = device.frame(1, readings(0..60));
    let (status, body, _) = device.send_batch(first.clone()).await;
    assert_eq!(status, 204, "{body}");
    // A resend after a lost answer is acknowledged again and stored once.
    assert_eq!(device.send_batch(first).await.0, 204);
    assert_eq!(
        device.send_batch(device.frame(2, readings(60..90))).await.0,
        204
    );

    let (status, series) = api
        .get(&format!("/api/v1/series?device={}", device.id))
        .await
        .unwrap();
    assert_eq!(status, 200, "{series}");
    let series = series.as_array().unwrap().clone();
    assert_eq!(series.len(), 3, "{series:?}");
    let by_channel = |c: &str| series.iter().find(|s| s["channel"] == c).unwrap().clone();
    let energy = by_channel("energy_import");
    let power = by_channel("power");
    assert_eq!(energy["points"], 90);
    assert_eq!(energy["unit"], "Wh");
    assert_eq!(power["unit"], "W");
    let from = synthetic::START_MS - 60_000;
    let to = synthetic::START_MS + 3_600_000;
    let (status, raw) = api
        .get(&format!(
            "/api/v1/series/{}/data?from={from}&to={to}",
            power["id"]
        ))
        .await
        .unwrap();
    assert_eq!(status, 200, "{raw}");
    let points = raw["points"].as_array().unwrap();
    assert_eq!(points.len(), 90);
    let expected: Vec<f64> = readings(0..90)
        .iter()
        .filter(|r| r.channel.name() == "power")
        .map(Reading::as_f64)
        .collect();
    let got: Vec<f64> = points.iter().map(|p| p[1].as_f64().unwrap()).collect();
    assert_eq!(got, expected);

    let (_, minutes) = api
        .get(&format!(
            "/api/v1/series/{}/data?from={from}&to={to}&resolution=1m&agg=max",
            power["id"]
        ))
        .await
        .unwrap();
    let buckets = minutes["points"].as_array().unwrap();
    assert!((3..=4).contains(&buckets.len()), "{minutes}");
    let max = buckets
        .iter()
        .map(|b| b[1].as_f64().unwrap())
        .fold(f64::MIN, f64::max);
    assert!((max - expected.iter().copied().fold(f64::MIN, f64::max)).abs() < 1e-9);

    let (_, energy_buckets) = api
        .get(&format!(
            "/api/v1/series/{}/data?from={from}&to={to}&resolution=1h&agg=energy",
            energy["id"]
        ))
        .await
        .unwrap();
    let total: f64 = energy_buckets["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p[1].as_f64().unwrap())
        .sum();
    let register: Vec<i64> = readings(0..90)
        .iter()
        .filter(|r| r.channel.name() == "energy_import")
        .map(|r| r.value)
        .collect();
    assert_eq!(total as i64, register.last().unwrap() - register[0]);

    let (status, body) = api
        .get(&format!(
            "/api/v1/series/{}/data?resolution=1h&agg=energy",
            power["id"]
        ))
        .await
        .unwrap();
    assert_eq!((status, body["error"].as_str()), (400, Some("invalid_agg")));
    let (status, body) = api
        .get(&format!(
            "/api/v1/series/{}/data?resolution=5m",
            power["id"]
        ))
        .await
        .unwrap();
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_resolution"))
    );
    let (status, body) = api.get("/api/v1/series?channel=heat").await.unwrap();
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_channel"))
    );
    let (status, _) = api.get("/api/v1/series/999999/data").await.unwrap();
    assert_eq!(status, 404);
}

pub(crate) async fn bad_frames_are_refused_and_nothing_is_stored(hub: &TestHub) {
    let api = hub.api();
    let (pk, _) = api.create_fleet("solar", true, 60).await.unwrap();
    let (_, _, device) = TestDevice::enroll(hub, &pk).await;
    let (_, _, other) = TestDevice::enroll(hub, &pk).await;
    let good = device.frame(1, readings(0..10));

    let (status, body, _) = device.send_batch(good[..good.len() / 2].to_vec()).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"].as_str().unwrap().starts_with("batch_"),
        "{body}"
    );
    let mut flipped = good.clone();
    flipped[10] ^= 1;
    let (status, body, _) = device.send_batch(flipped).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("batch_checksum"))
    );
    let (status, body, _) = other.send_batch(good.clone()).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("device_mismatch"))
    );
    let mut future = readings(0..1);
    future[0].ts_ms = drover_hub::store::now_ms() + 3_600_000;
    let (status, body, _) = device.send_batch(device.frame(2, future)).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (422, Some("implausible_batch"))
    );
    assert!(
        body["message"].as_str().unwrap().contains("clock"),
        "{body}"
    );
    let response = device
        .http
        .post(format!("{}/device/v1/batches", hub.url))
        .bearer_auth(&device.credential)
        .body(good.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 415);
    let (status, body, _) = device.send_batch(vec![0u8; 5 << 20]).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (413, Some("batch_too_large"))
    );
    let anonymous = reqwest::Client::new()
        .post(format!("{}/device/v1/batches", hub.url))
        .header("content-type", batch::CONTENT_TYPE)
        .body(good)
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);
    let (_, series) = api.get("/api/v1/series").await.unwrap();
    assert_eq!(series, json!([]), "nothing was stored");
}

pub(crate) async fn new_points_stream_live(hub: &TestHub) {
    let api = hub.api();
    let (pk, _) = api.create_fleet("solar", true, 60).await.unwrap();
    let (_, _, device) = TestDevice::enroll(hub, &pk).await;
    let mut stream = api
        .client
        .get(format!("{}/api/v1/live?device={}", hub.url, device.id))
        .bearer_auth(&api.token)
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    assert_eq!(
        stream.headers()["content-type"].to_str().unwrap(),
        "text/event-stream"
    );
    assert_eq!(
        device.send_batch(device.frame(1, readings(0..2))).await.0,
        204
    );
    let mut received = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while received.matches("event: point").count() < 6 {
        let chunk = tokio::time::timeout_at(deadline, stream.chunk())
            .await
            .expect("live points within 10s")
            .unwrap()
            .unwrap();
        received.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(received.contains("\"channel\":\"power\""), "{received}");
    assert!(
        received.contains(&format!("\"device\":\"{}\"", device.id)),
        "{received}"
    );
}

#[tokio::test]
async fn a_full_queue_answers_503_and_loses_nothing_acknowledged() {
    let hub = TestHub::start_with(Engine::Sqlite, |c| {
        c.ingest_queue_capacity = 1;
        c.ingest_group_max = 1;
    })
    .await
    .unwrap()
    .unwrap();
    let api = hub.api();
    let (pk, _) = api.create_fleet("solar", true, 60).await.unwrap();
    let mut devices = Vec::new();
    for _ in 0..6 {
        devices.push(std::sync::Arc::new(TestDevice::enroll(&hub, &pk).await.2));
    }
    // Hold SQLite's write lock so that the writer blocks on the first batch it takes.
    use sqlx::Connection as _;
    let url = format!("sqlite://{}", hub.data_dir.join("drover.db").display());
    let mut blocker = sqlx::SqliteConnection::connect(&url).await.unwrap();
    sqlx::raw_sql("BEGIN IMMEDIATE")
        .execute(&mut blocker)
        .await
        .unwrap();
    let sends: Vec<_> = devices
        .iter()
        .map(|device| {
            let device = std::sync::Arc::clone(device);
            tokio::spawn(async move {
                let frame = device.frame(1, readings(0..10));
                device.send_batch(frame).await
            })
        })
        .collect();
    // One batch is being written and one waits; the other four are turned away at once.
    wait_until(Duration::from_secs(10), "four refusals", || async {
        (sends.iter().filter(|s| s.is_finished()).count() >= 4).then_some(())
    })
    .await;
    let mut refused = Vec::new();
    let mut pending = Vec::new();
    for (device, send) in devices.iter().zip(sends) {
        if send.is_finished() {
            let (status, body, headers) = send.await.unwrap();
            assert_eq!(
                (status, body["error"].as_str()),
                (503, Some("queue_full")),
                "{body}"
            );
            assert!(headers.contains_key("retry-after"));
            refused.push(device);
        } else {
            pending.push(send);
        }
    }
    assert_eq!(refused.len(), 4);
    sqlx::raw_sql("ROLLBACK")
        .execute(&mut blocker)
        .await
        .unwrap();
    for send in pending {
        assert_eq!(send.await.unwrap().0, 204);
    }
    // The refused batches are still the devices' to send; sent again, they are stored.
    for device in refused {
        assert_eq!(
            device.send_batch(device.frame(1, readings(0..10))).await.0,
            204
        );
    }
    for device in &devices {
        let (_, series) = api
            .get(&format!("/api/v1/series?device={}", device.id))
            .await
            .unwrap();
        let points: i64 = series
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["points"].as_i64().unwrap())
            .sum();
        assert_eq!(points, 30, "device {}", device.id);
    }
    hub.stop().await.unwrap();
}

/// The points of a device's series, through the series list (which folds what has landed).
async fn points_of(api: &Api, device: &str) -> i64 {
    let (status, series) = api
        .get(&format!("/api/v1/series?device={device}"))
        .await
        .unwrap();
    assert_eq!(status, 200, "{series}");
    series
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["points"].as_i64().unwrap())
        .sum()
}

/// Batches are acknowledged once landed; a folder that never folds on its own (a long delay)
/// changes nothing a reader sees, since reads fold first; and when more has landed than the
/// folder has caught up with, devices are asked to come back later, with nothing lost.
#[tokio::test]
async fn landed_batches_are_read_at_once_and_a_folder_behind_slows_devices_down() {
    let hub = TestHub::start_with(Engine::Sqlite, |c| {
        c.ingest_fold_delay_ms = 600_000;
        c.ingest_fold_batches = 1;
    })
    .await
    .unwrap()
    .unwrap();
    let api = hub.api();
    let (pk, _) = api.create_fleet("solar", true, 60).await.unwrap();
    let (_, _, device) = TestDevice::enroll(&hub, &pk).await;
    let frames: Vec<Vec<u8>> = (0..20)
        .map(|k| device.frame(k as u64 + 1, readings(k * 10..(k + 1) * 10)))
        .collect();
    for frame in &frames[..3] {
        assert_eq!(device.send_batch(frame.clone()).await.0, 204);
    }
    // Read at once: every acknowledged point is there.
    assert_eq!(points_of(&api, &device.id).await, 90);
    // The folder's backlog may hold 16 folds of one batch; the next batch is turned away.
    for frame in &frames[3..19] {
        assert_eq!(device.send_batch(frame.clone()).await.0, 204);
    }
    let (status, body, headers) = device.send_batch(frames[19].clone()).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (503, Some("queue_full")),
        "{body}"
    );
    assert!(headers.contains_key("retry-after"));
    // A read folds the backlog; the batch sent again is taken.
    assert_eq!(points_of(&api, &device.id).await, 19 * 30);
    assert_eq!(device.send_batch(frames[19].clone()).await.0, 204);
    assert_eq!(points_of(&api, &device.id).await, 20 * 30);
    hub.stop().await.unwrap();
}

pub(crate) async fn seed_meter_notifications_are_stored_once(hub: &TestHub) {
    let api = hub.api();
    api.create_fleet("legacy", true, 60).await.unwrap();
    let (_, fleet) = api
        .patch("/api/v1/fleets/legacy", json!({"seed_protocol": true}))
        .await
        .unwrap();
    let base = format!("{}{}", hub.url, fleet["seed_base_path"].as_str().unwrap());
    let http = reqwest::Client::new();
    let post =
        |path: &'static str, body: Value| http.post(format!("{base}/{path}")).json(&body).send();
    // The Modbus reader's format: cumulative Wh per meter serial; sent twice (a retry).
    let modbus = json!({"deviceId": "seedbox01", "measurements": [
        {"serialNumber": "111", "energy": 1000, "time": "2026-10-05T10:00:00.000Z"},
        {"serialNumber": "111", "energy": 1010, "time": "2026-10-05T10:00:05.000Z"},
        {"serialNumber": 222, "energy": 500.5, "time": "2026-10-05T10:00:00.000Z"},
        {"serialNumber": 222, "energy": 501.25, "time": "2026-10-05T10:00:05.000Z"},
    ]});
    for _ in 0..2 {
        let response = post("modbusnotification", modbus.clone()).await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(
            response.json::<Value>().await.unwrap(),
            json!({"status": "ok"})
        );
    }
    let (_, series) = api.get("/api/v1/series?device=seedbox01").await.unwrap();
    let series = series.as_array().unwrap();
    assert_eq!(series.len(), 2, "{series:?}");
    assert!(
        series.iter().all(|s| s["points"] == 2),
        "a resend is stored once: {series:?}"
    );
    let fractional = series.iter().find(|s| s["meter"] == "modbus-222").unwrap();
    assert_eq!(fractional["last_value"], 501.25);

    // The pulse meter's format: energy per 10-second interval; an array, and (as the seed
    // split big backlogs) a single object; the overlap is deduplicated on (meter, end time).
    let events = |from: usize, to: usize| -> Vec<Value> {
        (from..to)
            .map(|i| json!({"endTime": format!("2026-10-05T10:00:{:02}.000Z", i * 10), "seconds": 10, "energy": 2}))
            .collect()
    };
    let response = post(
        "energynotification",
        json!([{"meterName": "12345", "events": events(1, 4)}]),
    )
    .await
    .unwrap();
    assert_eq!(response.status(), 200);
    let response = post(
        "energynotification",
        json!({"meterName": "12345", "events": events(3, 6)}),
    )
    .await
    .unwrap();
    assert_eq!(response.status(), 200);
    let (_, pulse) = api
        .get("/api/v1/series?channel=energy_interval")
        .await
        .unwrap();
    assert_eq!(pulse[0]["points"], 5, "{pulse}");
    let device = pulse[0]["device"].as_str().unwrap().to_string();
    assert!(device.starts_with("seedmeters-"), "{device}");
    let (status, report) = api
        .post(
            "/api/v1/reports",
            json!({"scope": "meter", "subject": format!("{device}/pulse-12345"), "month": "2026-10"}),
        )
        .await
        .unwrap();
    assert_eq!(status, 201, "{report}");
    assert_eq!(
        report["content"]["energy_wh"].as_f64(),
        Some(10.0),
        "five 2-Wh events, each counted once"
    );
    let (_, report) = api
        .post(
            "/api/v1/reports",
            json!({"scope": "meter", "subject": "seedbox01/modbus-111", "month": "2026-10"}),
        )
        .await
        .unwrap();
    assert_eq!(report["content"]["energy_wh"].as_f64(), Some(10.0));
    // A register stored in hundredths (500.5 Wh, then 501.25) is reported in Wh.
    let (_, report) = api
        .post(
            "/api/v1/reports",
            json!({"scope": "meter", "subject": "seedbox01/modbus-222", "month": "2026-10"}),
        )
        .await
        .unwrap();
    assert_eq!(
        report["content"]["energy_wh"].as_f64(),
        Some(0.75),
        "{report}"
    );

    let response = post("modbusnotification", json!({"measurements": []}))
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let future = json!({"deviceId": "seedbox01", "measurements": [
        {"serialNumber": "111", "energy": 1020, "time": "2099-01-01T00:00:00.000Z"}]});
    let response = post("modbusnotification", future).await.unwrap();
    assert_eq!(response.status(), 422);
    let bad_time = json!({"deviceId": "seedbox01", "measurements": [
        {"serialNumber": "111", "energy": 1020, "time": "yesterday"}]});
    let response = post("modbusnotification", bad_time).await.unwrap();
    assert_eq!(response.status(), 400);
    let (_, series) = api
        .get("/api/v1/series?device=seedbox01&meter=modbus-111")
        .await
        .unwrap();
    assert_eq!(series[0]["points"], 2, "refused requests stored nothing");

    // In a fleet that waits for an operator, a new box's readings are refused (the seed's
    // reader keeps them and sends them again) until it is accepted.
    api.create_fleet("manual", false, 60).await.unwrap();
    let (_, fleet) = api
        .patch("/api/v1/fleets/manual", json!({"seed_protocol": true}))
        .await
        .unwrap();
    let base = format!("{}{}", hub.url, fleet["seed_base_path"].as_str().unwrap());
    let readings = json!({"deviceId": "seedbox02", "measurements": [
        {"serialNumber": "333", "energy": 10, "time": "2026-10-05T10:00:00.000Z"}]});
    let send = || {
        http.post(format!("{base}/modbusnotification"))
            .json(&readings)
            .send()
    };
    let response = send().await.unwrap();
    assert_eq!(response.status(), 403);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "device_pending", "{body}");
    let (_, series) = api.get("/api/v1/series?device=seedbox02").await.unwrap();
    assert_eq!(series, json!([]), "nothing stored before acceptance");
    let (status, _) = api
        .post("/api/v1/devices/seedbox02/accept", json!({}))
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(send().await.unwrap().status(), 200);
    let (_, series) = api.get("/api/v1/series?device=seedbox02").await.unwrap();
    assert_eq!(series[0]["points"], 1, "{series}");
}

pub(crate) async fn telemetry_status_from_checkins_is_shown(hub: &TestHub) {
    let api = hub.api();
    let (pk, _) = api.create_fleet("solar", true, 60).await.unwrap();
    let (_, _, device) = TestDevice::enroll(hub, &pk).await;
    let status = drover_protocol::device::TelemetryStatus {
        spooled: 1_200,
        dropped: 37,
        month_bytes: 4_000_000,
        budget_bytes: Some(50_000_000),
        batch_interval_s: 120,
    };
    let request = drover_protocol::device::CheckinRequest {
        protocol: 1,
        desired_etag: None,
        current_release: None,
        agent_version: "0.1.0".into(),
        update: drover_protocol::device::UpdateStatus::idle(),
        facts: None,
        telemetry: Some(status.clone()),
    };
    let response = device
        .http
        .post(format!("{}/device/v1/checkin", hub.url))
        .bearer_auth(&device.credential)
        .json(&request)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        device.send_batch(device.frame(1, readings(0..5))).await.0,
        204
    );
    let (_, view) = api
        .get(&format!("/api/v1/devices/{}", device.id))
        .await
        .unwrap();
    assert_eq!(view["telemetry"]["dropped"], 37, "{view}");
    assert_eq!(view["telemetry"]["budget_bytes"], 50_000_000);
    assert!(view["telemetry_bytes"].as_i64().unwrap() > 0, "{view}");
}

/// An open telemetry stream, as a test drives it: messages in, reply lines out.
struct TestStream {
    body: tokio::sync::mpsc::Sender<Vec<u8>>,
    response: reqwest::Response,
    buf: Vec<u8>,
    last_seq: u64,
}

impl TestStream {
    async fn open(device: &TestDevice) -> Result<TestStream, (u16, Value)> {
        let (body, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(16);
        let stream = futures_util::stream::poll_fn(move |cx| {
            rx.poll_recv(cx).map(|m| m.map(Ok::<_, std::io::Error>))
        });
        let response = device
            .http
            .post(format!("{}/device/v1/batches/stream", device.base))
            .bearer_auth(&device.credential)
            .header("content-type", batch::stream::CONTENT_TYPE)
            .body(reqwest::Body::wrap_stream(stream))
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        if status != 200 {
            let text = response.text().await.unwrap();
            return Err((status, serde_json::from_str(&text).unwrap_or(Value::Null)));
        }
        assert_eq!(
            response.headers()["content-type"],
            batch::stream::REPLY_CONTENT_TYPE
        );
        let last_seq = response.headers()["drover-last-seq"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        Ok(TestStream {
            body,
            response,
            buf: Vec::new(),
            last_seq,
        })
    }

    async fn send(&self, frame: &[u8], ack: bool) {
        let mut message = Vec::new();
        batch::stream::encode_message(frame, ack, &mut message);
        self.body.send(message).await.unwrap();
    }

    async fn send_raw(&self, bytes: &[u8]) {
        self.body.send(bytes.to_vec()).await.unwrap();
    }

    /// The next reply line; `None` once the hub ended the stream.
    async fn reply(&mut self) -> Option<Value> {
        loop {
            if let Some(end) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=end).collect();
                return Some(serde_json::from_slice(&line).unwrap());
            }
            let chunk = tokio::time::timeout(Duration::from_secs(20), self.response.chunk())
                .await
                .expect("no reply from the hub")
                .unwrap()?;
            self.buf.extend_from_slice(&chunk);
        }
    }

    /// Reads the refusal that ends the stream (after the `stored` line before it).
    async fn refusal(&mut self) -> Value {
        let stored = self
            .reply()
            .await
            .expect("a stored line before the refusal");
        assert!(stored.get("stored").is_some(), "{stored}");
        let refused = self.reply().await.expect("a refusal");
        assert!(refused.get("refused").is_some(), "{refused}");
        assert_eq!(
            self.reply().await,
            None,
            "the stream goes on after a refusal"
        );
        refused
    }
}

pub(crate) async fn the_stream_stores_in_order_answers_when_asked_and_refuses_bad_messages(
    hub: &TestHub,
) {
    let api = hub.api();
    let (pk, _) = api.create_fleet("solar", true, 60).await.unwrap();
    let (_, _, device) = TestDevice::enroll(hub, &pk).await;

    let mut stream = TestStream::open(&device).await.unwrap();
    assert_eq!(stream.last_seq, 0);
    // Unasked, the hub says nothing; asked, it confirms everything up to then at once.
    stream.send(&device.frame(1, readings(0..30)), false).await;
    stream.send(&device.frame(2, readings(30..60)), true).await;
    assert_eq!(stream.reply().await, Some(json!({"stored": 2})));
    // A resend is confirmed and stored once; a bare request for an answer gets one.
    stream.send(&device.frame(1, readings(0..30)), false).await;
    stream.send(&[], true).await;
    assert_eq!(stream.reply().await, Some(json!({"stored": 2})));
    // A reading far in the future: refused like the request would be, and the stream ends
    // without reading what came after it.
    let mut future = readings(60..90);
    future[0].ts_ms = drover_hub::store::now_ms() + 3_600_000;
    stream.send(&device.frame(3, future), false).await;
    stream.send(&device.frame(4, readings(90..120)), true).await;
    let refused = stream.refusal().await;
    assert_eq!(refused["refused"], 3);
    assert_eq!(refused["status"], 422);
    assert_eq!(refused["error"], "implausible_batch");

    // A new stream starts from what is stored: batch 4 was never read. Stream frames are read
    // against the frames before them on the same stream, starting from that number.
    let mut stream = TestStream::open(&device).await.unwrap();
    assert_eq!(stream.last_seq, 2);
    let id = DeviceId::parse(&device.id).unwrap();
    let mut context = StreamContext::new(id.clone(), stream.last_seq);
    let frames: Vec<Vec<u8>> = [(3, 60..90), (4, 90..120)]
        .into_iter()
        .map(|(seq, polls)| {
            context
                .encode(&Batch {
                    device: id.clone(),
                    seq,
                    readings: readings(polls),
                })
                .unwrap()
        })
        .collect();
    assert!(frames[1].len() < device.frame(4, readings(90..120)).len());
    stream.send(&frames[0], false).await;
    stream.send(&frames[1], true).await;
    assert_eq!(stream.reply().await, Some(json!({"stored": 4})));
    drop(stream);
    // Outside the stream a stream frame means nothing.
    let (status, body, _) = device.send_batch(frames[0].clone()).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"], "batch_invalid", "{body}");

    // Frames the request path refuses are refused here with the same codes.
    let other = DeviceId::parse("zzzzzzzzzz").unwrap();
    let foreign = batch::encode(&Batch {
        device: other,
        seq: 5,
        readings: readings(120..130),
    })
    .unwrap();
    let mut damaged = device.frame(5, readings(120..130));
    let n = damaged.len();
    damaged[n - 1] ^= 0xff;
    let mut too_large = Vec::new();
    let huge = ((batch::MAX_BATCH_BYTES as u64) + 1) << 1;
    for shift in [0, 7, 14] {
        too_large.push(((huge >> shift) & 0x7f) as u8 | 0x80);
    }
    too_large.push((huge >> 21) as u8);
    for (bytes, status, code) in [
        (message(&foreign), 403, "device_mismatch"),
        (message(&damaged), 400, "batch_checksum"),
        (vec![0x80, 0x80, 0x80, 0x80, 0x80], 400, "stream_header"),
        (too_large, 413, "batch_too_large"),
    ] {
        let mut stream = TestStream::open(&device).await.unwrap();
        stream.send_raw(&bytes).await;
        let refused = stream.refusal().await;
        assert_eq!(refused["status"], status, "{refused}");
        assert_eq!(refused["error"], code, "{refused}");
        assert!(!refused["message"].as_str().unwrap().is_empty());
    }
    // A body that ends inside a message.
    let mut stream = TestStream::open(&device).await.unwrap();
    stream
        .send_raw(&message(&device.frame(5, readings(120..130)))[..20])
        .await;
    // Ends the body: the old sender is dropped.
    stream.body = tokio::sync::mpsc::channel(1).0;
    let refused = stream.refusal().await;
    assert_eq!(refused["error"], "batch_truncated", "{refused}");

    // Nothing of the refused messages was stored: batches 1 to 4, 120 polls of 3 channels.
    let (_, series) = api
        .get(&format!("/api/v1/series?device={}", device.id))
        .await
        .unwrap();
    let total: u64 = series
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["points"].as_u64().unwrap())
        .sum();
    assert_eq!(total, 360, "{series}");

    // The stream is the device's: a wrong content type or credential is refused when it opens,
    // and a device revoked while its stream is open is stopped at its next batch.
    for (credential, content_type, status) in [
        ("drv_d_wrong", batch::stream::CONTENT_TYPE, 401),
        (device.credential.as_str(), "application/json", 415),
    ] {
        let response = device
            .http
            .post(format!("{}/device/v1/batches/stream", device.base))
            .bearer_auth(credential)
            .header("content-type", content_type)
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), status);
    }
    let mut stream = TestStream::open(&device).await.unwrap();
    let (status, _) = api
        .post(&format!("/api/v1/devices/{}/revoke", device.id), json!({}))
        .await
        .unwrap();
    assert_eq!(status, 200);
    stream
        .send(&device.frame(5, readings(120..150)), true)
        .await;
    let refused = stream.refusal().await;
    assert_eq!(refused["status"], 403, "{refused}");
    assert_eq!(refused["error"], "device_revoked", "{refused}");
}

fn message(frame: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    batch::stream::encode_message(frame, true, &mut out);
    out
}
