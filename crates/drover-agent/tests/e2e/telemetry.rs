//! Telemetry end to end: meter sources on the agent, the spool, the sender, the hub's bridge,
//! queue and store, read back through the management API.
//!
//! The exactly-once tests use a counting meter: a command source whose every run prints the
//! next number of a counter kept in a file, so every reading the agent takes is unique and
//! their values tell what is missing or doubled. After the agent and the hub have been killed,
//! restarted and cut off, the hub must hold every reading the spool ever took in exactly once:
//! as many points as the spool's count of appended readings, all different, in order.

use std::time::Duration;

use drover_agent::config::{SpoolConfig, TelemetryConfig};
use drover_agent::meters::config::{CommandSourceConfig, ModbusSourceConfig};
use drover_agent::spool::Spool;
use drover_test_support::{CuttingProxy, Engine, wait_until};
use serde_json::Value;

use crate::common::{Device, Fleet, PATIENCE};
use crate::gateway::{Gateway, MODELS};

both_engines!(simulated_meters_reach_the_hub_and_the_device_reports_its_telemetry);

/// Sends every 200 ms and syncs the spool every 20 ms, so that tests move quickly.
fn quick(device: &mut Device) {
    device.config.telemetry = TelemetryConfig {
        batch_interval: Duration::from_millis(200),
        ..TelemetryConfig::default()
    };
    device.config.spool = SpoolConfig {
        sync_interval: Duration::from_millis(20),
        ..SpoolConfig::default()
    };
}

/// Adds the counting meters `counter-0` .. `counter-<meters - 1>` (channel `energy_import`),
/// read every `every`: each run prints the counter's next value for each of them.
fn counting_meter(device: &mut Device, every: Duration, meters: usize) {
    let file = device.path("counter");
    let command = format!(
        "n=$(cat {f} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {f}.tmp && mv {f}.tmp {f} && for i in $(seq 0 {last}); do echo \"counter-$i energy_import $n\"; done",
        f = file.display(),
        last = meters - 1,
    );
    device.config.meters.command.push(CommandSourceConfig {
        name: "counter".into(),
        command,
        interval: every,
        ..CommandSourceConfig::default()
    });
}

/// The series of a device, from `GET /api/v1/series?device=`.
async fn series_of(fleet: &Fleet, device: &str) -> Vec<Value> {
    let (status, body) = fleet
        .api
        .get(&format!("/api/v1/series?device={device}"))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    body.as_array().unwrap().clone()
}

/// Every raw point of the device's `meter`/`channel` series: `(time, value)`.
async fn points(fleet: &Fleet, device: &str, meter: &str, channel: &str) -> Vec<(i64, f64)> {
    let series = series_of(fleet, device).await;
    let Some(series) = series
        .iter()
        .find(|s| s["meter"] == meter && s["channel"] == channel)
    else {
        return Vec::new();
    };
    let (status, body) = fleet
        .api
        .get(&format!(
            "/api/v1/series/{}/data?from=0&to=99999999999999",
            series["id"]
        ))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    body["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p[0].as_i64().unwrap(), p[1].as_f64().unwrap()))
        .collect()
}

/// Waits until a check-in from the agent started last reports an empty spool.
async fn drained(fleet: &Fleet, id: &str) {
    fleet.wait_checkins(id, 2).await;
    fleet
        .wait_device(id, "the spool to drain", |d| d["telemetry"]["spooled"] == 0)
        .await;
}

/// Waits until the counting meter `counter-0` has at least `n` points stored.
async fn wait_counted(fleet: &Fleet, id: &str, n: usize, what: &str) {
    wait_until(PATIENCE, what, || async {
        let stored = points(fleet, id, "counter-0", "energy_import").await.len();
        (stored >= n).then_some(())
    })
    .await;
}

/// Checks the counting meter's points: all different, rising with time, and as many as the
/// spool took in. Returns how many there are.
async fn assert_each_reading_stored_once(fleet: &Fleet, device: &Device, id: &str) -> usize {
    let spool = Spool::open(&device.config.state_dir.join("spool"), &device.config.spool).unwrap();
    let appended = spool.appended_total();
    assert_eq!(spool.pending_readings(), 0, "the spool is not empty");
    assert_eq!(spool.dropped_total(), 0);
    drop(spool);
    let points = points(fleet, id, "counter-0", "energy_import").await;
    let values: Vec<i64> = points.iter().map(|p| p.1 as i64).collect();
    assert!(
        values.windows(2).all(|w| w[0] < w[1]),
        "values not unique and rising with time: {values:?}"
    );
    assert_eq!(
        points.len() as u64,
        appended,
        "the hub holds {} points, the spool took {appended}",
        points.len()
    );
    let checksum: i64 = values.iter().sum();
    let max = values.last().copied().unwrap_or(0);
    // Readings are missing only where a kill came between a run of the command and the spool.
    assert!(
        checksum <= max * (max + 1) / 2,
        "checksum {checksum} too high for values up to {max}"
    );
    points.len()
}

async fn simulated_meters_reach_the_hub_and_the_device_reports_its_telemetry(engine: Engine) {
    let Some(fleet) = Fleet::start(engine).await else {
        return;
    };
    let mut device = Device::new(&fleet);
    quick(&mut device);
    device
        .config
        .meters
        .simulated
        .push(drover_agent::meters::config::SimulatedSourceConfig {
            name: "roof".into(),
            interval: Duration::from_millis(100),
            ..Default::default()
        });
    let agent = device.start();
    let id = device.wait_enrolled().await;
    let series = wait_until(PATIENCE, "the simulated meter's series", || async {
        let series = series_of(&fleet, &id).await;
        (series.len() >= 3).then_some(series)
    })
    .await;
    let meter = series[0]["meter"].as_str().unwrap().to_string();
    assert!(series.iter().all(|s| s["meter"] == meter), "{series:?}");
    let channels: Vec<&str> = series
        .iter()
        .map(|s| s["channel"].as_str().unwrap())
        .collect();
    assert!(channels.contains(&"energy_import"), "{channels:?}");
    assert!(channels.contains(&"power"), "{channels:?}");
    // More batches arrive while the agent runs.
    wait_until(PATIENCE, "points from several batches", || async {
        (points(&fleet, &id, &meter, "power").await.len() >= 20).then_some(())
    })
    .await;
    // The check-ins report the spool and the bytes sent this month.
    let shown = fleet
        .wait_device(&id, "telemetry status in a check-in", |d| {
            d["telemetry"]["month_bytes"].as_u64().unwrap_or(0) > 0
        })
        .await;
    assert_eq!(shown["telemetry"]["dropped"], 0, "{shown}");
    assert_eq!(shown["telemetry"]["batch_interval_s"], 1, "{shown}");
    agent.stop().await;
}

/// Meters on a real Modbus TCP gateway: discovered, read, and stored under their serial numbers,
/// sent over HTTPS (HTTP/2, as the agent offers it) to a hub with its own CA.
#[tokio::test]
async fn modbus_meters_on_a_gateway_reach_the_hub_under_their_serial_numbers() {
    let hub = drover_test_support::TestHub::start_with(Engine::Sqlite, |config| {
        config.tls = Some(drover_hub::config::TlsConfig {
            cert: None,
            key: None,
            self_signed: true,
            names: Vec::new(),
        });
    })
    .await
    .unwrap()
    .unwrap();
    let fleet = Fleet::on(hub, true).await;
    assert!(fleet.hub.url.starts_with("https://"));
    let gateway = Gateway::start().await;
    let eastron = MODELS[2];
    gateway.meter(eastron, 0, 41_000_001, 1_234_567);
    gateway.meter(eastron, 1, 41_000_002, 7_654_321);
    let mut device = Device::new(&fleet);
    quick(&mut device);
    device.config.meters.modbus.push(ModbusSourceConfig {
        name: "gateway".into(),
        host: "127.0.0.1".into(),
        port: gateway.port(),
        map: eastron.map.into(),
        interval: Duration::from_millis(100),
        ..ModbusSourceConfig::default()
    });
    let agent = device.start();
    let id = device.wait_enrolled().await;
    for (serial, register) in [("41000001", 1_234_567.0), ("41000002", 7_654_321.0)] {
        let meter = format!("modbus-{serial}");
        let stored = wait_until(PATIENCE, "the meter's energy readings", || async {
            let points = points(&fleet, &id, &meter, "energy_import").await;
            (!points.is_empty()).then_some(points)
        })
        .await;
        // The Eastron map reads the register in 0.1 kWh steps: ×10 into Wh.
        let expected = register * eastron.factor as f64;
        assert_eq!(stored[0].1, expected, "{meter}: {stored:?}");
    }
    agent.stop().await;
}

/// The agent binary killed again and again while it reads, spools and sends; the hub restarted
/// during ingest; acknowledgements lost on the way back. Every reading is stored exactly once.
#[tokio::test]
async fn kills_restarts_and_lost_acknowledgements_store_every_reading_exactly_once() {
    kills_restarts_and_lost_acknowledgements(true).await;
}

#[tokio::test]
async fn kills_restarts_and_lost_acknowledgements_with_a_request_per_batch() {
    kills_restarts_and_lost_acknowledgements(false).await;
}

/// The agent killed while spooling and sending, answers cut after the hub stored, and the hub
/// restarted: every reading stored exactly once, on the telemetry stream (`stream`) or with a
/// request per batch.
async fn kills_restarts_and_lost_acknowledgements(stream: bool) {
    let fleet = Fleet::sqlite().await;
    // The first two batches' answers are cut after the hub stored them: the agent must send it again
    // under the same number, and the hub must drop the copy.
    // On the stream, the cut comes after the answer's head (about 140 bytes), inside the
    // first confirmation.
    let cut_after = if stream { 150 } else { 0 };
    let proxy = CuttingProxy::start(fleet.hub.hub.addr, "/device/v1/batches", cut_after, 2)
        .await
        .unwrap();
    let mut device = Device::via(&fleet, &proxy);
    quick(&mut device);
    device.config.telemetry.stream = stream;
    // On the stream, a confirmation every 5 batches, so that kills and cuts find some waiting.
    device.config.telemetry.ack_interval = Duration::from_secs(1);
    counting_meter(&mut device, Duration::from_millis(100), 1);
    let mut agent = device.spawn(None);
    let id = device.wait_enrolled().await;

    // Kill it at points chosen by its progress: while points flow, so some kills land while a
    // batch is on the wire and others while readings are only in the spool.
    for round in 1..=5 {
        let target = round * 15;
        wait_counted(&fleet, &id, target, "more points stored").await;
        agent.kill().await.unwrap();
        agent = device.spawn(None);
    }
    assert!(proxy.cuts_done() >= 1, "no acknowledgement was lost");
    let streams = proxy
        .requests()
        .iter()
        .filter(|r| r.path == "/device/v1/batches/stream")
        .count();
    let requests = proxy
        .requests()
        .iter()
        .filter(|r| r.path == "/device/v1/batches")
        .count();
    if stream {
        assert!(
            streams >= 6,
            "{streams} streams opened (one per agent at least)"
        );
        assert_eq!(requests, 0, "batches went as requests besides the stream");
    } else {
        assert_eq!(streams, 0);
        assert!(requests > 10);
    }

    // The hub restarted while the agent sends.
    let fleet = Fleet {
        hub: fleet.hub.restart().await.unwrap(),
        ..fleet
    };
    let before = points(&fleet, &id, "counter-0", "energy_import")
        .await
        .len();
    wait_counted(&fleet, &id, before + 20, "points after the hub's restart").await;

    // Stop reading (the counter stays where it is), let the spool drain, then count.
    agent.kill().await.unwrap();
    device.config.meters.command.clear();
    let mut agent = device.spawn(None);
    drained(&fleet, &id).await;
    agent.kill().await.unwrap();
    let status = device.status_command();
    assert!(status.contains("telemetry:"), "{status}");
    let stored = assert_each_reading_stored_once(&fleet, &device, &id).await;
    // No reading came twice under different batch numbers (which the hub's per-series time
    // check would have hidden from the counts above): every resend kept its number.
    assert_eq!(fleet.device(&id).await["duplicate_points"], 0);
    assert!(stored >= 95, "only {stored} points");
}

/// The counting meters of the full-spool test.
const METERS: usize = 20;

/// Every point of the counting meters `counter-0` .. `counter-<meters - 1>`, meter by meter.
async fn all_counter_points(fleet: &Fleet, id: &str, meters: usize) -> Vec<Vec<(i64, f64)>> {
    let mut all = Vec::new();
    for i in 0..meters {
        all.push(points(fleet, id, &format!("counter-{i}"), "energy_import").await);
    }
    all
}

/// The hub unreachable until the spool overflows: the oldest readings are dropped, and the
/// number dropped reaches the hub; what was kept is sent once the hub is back.
#[tokio::test]
async fn a_full_spool_drops_the_oldest_readings_and_reports_how_many() {
    let fleet = Fleet::sqlite().await;
    let proxy = CuttingProxy::forward(fleet.hub.hub.addr).await.unwrap();
    let mut device = Device::via(&fleet, &proxy);
    quick(&mut device);
    // Two 4 KiB segments at most: a few hundred readings, a few seconds of 20 meters.
    device.config.spool.segment_bytes = 4096;
    device.config.spool.max_bytes = 8192;
    counting_meter(&mut device, Duration::from_millis(100), METERS);
    let running = device.start();
    let id = device.wait_enrolled().await;
    wait_counted(&fleet, &id, 1, "the first points").await;
    proxy.set_offline(true);
    let spool_state = device.config.state_dir.join("spool").join("state.json");
    wait_until(PATIENCE, "the spool to drop readings", || async {
        let text = std::fs::read_to_string(&spool_state).unwrap_or_default();
        let state: Value = serde_json::from_str(&text).unwrap_or_default();
        (state["dropped_total"].as_u64().unwrap_or(0) > 0).then_some(())
    })
    .await;
    proxy.set_offline(false);
    let shown = fleet
        .wait_device(&id, "the drop count on the hub", |d| {
            d["telemetry"]["dropped"].as_u64().unwrap_or(0) > 0
        })
        .await;
    running.stop().await;
    // Drained without the meter, what the hub holds plus what was dropped is everything the
    // spool took in (a batch stored just as the link went down may be counted in both).
    device.config.meters.command.clear();
    let running = device.start();
    drained(&fleet, &id).await;
    running.stop().await;
    let spool = Spool::open(&device.config.state_dir.join("spool"), &device.config.spool).unwrap();
    let (appended, dropped) = (spool.appended_total(), spool.dropped_total());
    assert_eq!(spool.pending_readings(), 0);
    drop(spool);
    let stored = all_counter_points(&fleet, &id, METERS).await;
    let count: u64 = stored.iter().map(|p| p.len() as u64).sum();
    assert!(count <= appended, "stored {count} > appended {appended}");
    assert!(
        count + dropped >= appended,
        "stored {count} + dropped {dropped} < appended {appended}"
    );
    assert!(
        shown["telemetry"]["dropped"].as_u64().unwrap() <= dropped,
        "{shown}"
    );
    // The oldest were dropped: each meter's values, stored in time order, still rise, with a
    // gap where the spool made room.
    for points in &stored {
        let values: Vec<i64> = points.iter().map(|p| p.1 as i64).collect();
        assert!(values.windows(2).all(|w| w[0] < w[1]), "{values:?}");
    }
}

/// A monthly budget far below what the meter's batches need widens the interval, and the device
/// says so in its check-ins.
#[tokio::test]
async fn a_tight_monthly_budget_widens_the_batch_interval() {
    let fleet = Fleet::sqlite().await;
    let mut device = Device::new(&fleet);
    quick(&mut device);
    // So small that even in the last minutes of a month it cannot last at this pace.
    device.config.telemetry.monthly_budget_bytes = Some(1000);
    device.config.telemetry.max_batch_interval = Duration::from_secs(3600);
    counting_meter(&mut device, Duration::from_millis(100), 1);
    let running = device.start();
    let id = device.wait_enrolled().await;
    let shown = fleet
        .wait_device(&id, "a widened interval", |d| {
            d["telemetry"]["batch_interval_s"].as_u64().unwrap_or(0) > 1
        })
        .await;
    assert_eq!(shown["telemetry"]["budget_bytes"], 1000, "{shown}");
    running.stop().await;
}

/// A reading the hub refuses (a time far in the future) in the middle of the spool: the sender
/// halves its batch until only that record is refused, drops and counts it, and sends the rest.
#[tokio::test]
async fn a_refused_reading_costs_only_its_own_record() {
    use std::sync::{Arc, Mutex};

    use drover_agent::client::HubClient;
    use drover_agent::config::AgentConfig;
    use drover_agent::sender::{Enrolled, Sender};
    use drover_protocol::reading::{Channel, ClockState, MeterId, Reading};
    use drover_test_support::device::BareDevice;

    let fleet = Fleet::sqlite().await;
    let device = BareDevice::enroll(&fleet.hub.url, &fleet.provisioning_key)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut spool = Spool::open(&dir.path().join("spool"), &SpoolConfig::default()).unwrap();
    let now = drover_agent::outbox::now_ms();
    let reading = |ts_ms: i64, value: i64| Reading {
        meter: MeterId::parse("meter-1").unwrap(),
        channel: Channel::EnergyImport,
        ts_ms,
        value,
        scale: 0,
        clock: ClockState::Synced,
    };
    // Eight records of five readings; the fourth holds one reading a day ahead.
    let mut value = 0;
    for record in 0..8 {
        let readings: Vec<Reading> = (0..5)
            .map(|i| {
                value += 1;
                let ts = now - 600_000 + value * 1000;
                reading(
                    if record == 3 && i == 2 {
                        ts + 86_400_000
                    } else {
                        ts
                    },
                    value,
                )
            })
            .collect();
        spool.append(&readings).unwrap();
    }
    spool.sync().unwrap();
    let spool = Arc::new(Mutex::new(spool));
    let client = HubClient::new(&AgentConfig {
        hub_url: fleet.hub.url.clone(),
        ..AgentConfig::default()
    })
    .unwrap();
    let (_enrolled, watch) = tokio::sync::watch::channel(Some(Enrolled {
        device: device.id.clone(),
        credential: device.credential.clone(),
    }));
    let (sender, telemetry) = Sender::new(
        spool,
        client,
        watch,
        TelemetryConfig {
            batch_interval: Duration::from_millis(100),
            ..TelemetryConfig::default()
        },
        dir.path().join("telemetry.json"),
    )
    .unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(sender.run(shutdown.clone()));
    wait_until(PATIENCE, "the spool to drain", || async {
        (telemetry.status().spooled == 0).then_some(())
    })
    .await;
    shutdown.cancel();
    task.await.unwrap().unwrap();
    let status = telemetry.status();
    assert_eq!(status.dropped, 5, "{status:?}");
    assert!(status.month_bytes > 0);
    let stored = points(&fleet, device.id.as_str(), "meter-1", "energy_import").await;
    let values: Vec<i64> = stored.iter().map(|p| p.1 as i64).collect();
    let expected: Vec<i64> = (1..=40).filter(|v| !(16..=20).contains(v)).collect();
    assert_eq!(values, expected);
}

/// The sender's state lost (or restored from an old copy) while the credential stays: its batch
/// counter starts again below the hub's. The hub's answer to the first such batch names its
/// highest number; the agent renumbers past it, so no new batch is taken for a resend.
#[tokio::test]
async fn a_batch_counter_that_went_back_is_renumbered_not_lost() {
    let fleet = Fleet::sqlite().await;
    let mut device = Device::new(&fleet);
    quick(&mut device);
    counting_meter(&mut device, Duration::from_millis(100), 1);
    let running = device.start();
    let id = device.wait_enrolled().await;
    wait_counted(&fleet, &id, 20, "some batches stored").await;
    running.stop().await;
    std::fs::remove_file(device.config.state_dir.join("telemetry.json")).unwrap();

    let running = device.start();
    wait_counted(&fleet, &id, 40, "points after the counter went back").await;
    running.stop().await;
    device.config.meters.command.clear();
    let running = device.start();
    drained(&fleet, &id).await;
    running.stop().await;
    let status = device.status();
    let telemetry = status.telemetry.unwrap();
    assert!(telemetry.next_seq > 2, "{telemetry:?}");
    // (With its sender state gone the agent may send its last batch's readings again under a
    // new number: stored once, and counted in the device's duplicate_points.)
    assert_each_reading_stored_once(&fleet, &device, &id).await;
}
