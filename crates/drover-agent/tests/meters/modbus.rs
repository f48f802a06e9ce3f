//! Modbus TCP sources against a real Modbus TCP server laid out like a gateway.

use std::time::Duration;

use drover_agent::meters::MetersConfig;
use drover_agent::meters::config::ModbusSourceConfig;
use drover_protocol::reading::{Channel, ClockState};
use tokio::net::TcpListener;
use tokio_modbus::ExceptionCode;

use crate::gateway::{Fault, Gateway, MODELS};
use crate::{Running, meters_in, values};

/// Above 2^48: the seed read only the low 6 bytes of the 8-byte register and lost this.
const BIG: u64 = (1 << 48) + 7;

fn source(gateway: &Gateway, map: &str) -> ModbusSourceConfig {
    ModbusSourceConfig {
        name: format!("gw-{map}"),
        host: "127.0.0.1".into(),
        port: gateway.port(),
        map: map.into(),
        interval: Duration::from_millis(100),
        timeout: Duration::from_millis(500),
        connect_timeout: Duration::from_secs(2),
        discovery_retry: Duration::from_millis(200),
        ..ModbusSourceConfig::default()
    }
}

fn start(sources: Vec<ModbusSourceConfig>) -> Running {
    Running::start(&MetersConfig {
        modbus: sources,
        ..MetersConfig::default()
    })
}

fn id(serial: u32) -> String {
    format!("modbus-{serial}")
}

#[tokio::test]
async fn discovery_finds_exactly_the_meters_of_each_built_in_map() {
    for model in MODELS {
        let gateway = Gateway::start().await;
        gateway.meter(model, 0, 11_111_111, 1_234);
        gateway.meter(model, 1, 22_222_222, BIG);
        gateway.meter(model, 2, 33_333_333, 0);
        // Slot 3 is empty (serial 0): the walk ends there, as the seed's did, so the meter in
        // slot 4 is not found.
        gateway.meter(model, 4, 44_444_444, 5);
        let mut running = start(vec![source(&gateway, model.map)]);
        let batch = running.next().await;
        let f = model.factor;
        assert_eq!(
            values(&batch, Channel::EnergyImport),
            [
                (id(11_111_111), 1_234 * f),
                (id(22_222_222), BIG as i64 * f),
                (id(33_333_333), 0),
            ],
            "{}",
            model.map
        );
        assert!(
            batch
                .iter()
                .all(|r| r.scale == 0 && r.clock == ClockState::Synced)
        );
    }
}

#[tokio::test]
async fn discovery_stops_at_all_ones_and_an_explicit_slot_list_sees_past_gaps() {
    let model = MODELS[0];
    let gateway = Gateway::start().await;
    gateway.meter(model, 0, 11_111_111, 10);
    gateway.meter(model, 1, 22_222_222, 20);
    // Newer gateways answer 0xFFFFFFFF for an empty slot.
    gateway.serial(model, 2, 0xFFFF_FFFF);
    gateway.meter(model, 3, 33_333_333, 30);
    gateway.meter(model, 5, 55_555_555, 50);
    let mut walk = start(vec![source(&gateway, "sec")]);
    assert_eq!(
        meters_in(&walk.next().await),
        [id(11_111_111), id(22_222_222)]
    );
    let listed = ModbusSourceConfig {
        slots: Some(vec![0, 2, 3, 4, 5]),
        ..source(&gateway, "sec")
    };
    let mut listed = start(vec![listed]);
    assert_eq!(
        meters_in(&listed.next().await),
        [id(11_111_111), id(33_333_333), id(55_555_555)]
    );
}

#[tokio::test]
async fn a_meter_answering_with_an_exception_does_not_drop_the_others() {
    let model = MODELS[1];
    let gateway = Gateway::start().await;
    for slot in 0..3 {
        gateway.meter(model, slot, 1_000 + u32::from(slot), u64::from(slot) + 1);
    }
    gateway.fail(
        Gateway::energy_range(model, 1),
        Fault::Exception(ExceptionCode::GatewayTargetDevice),
    );
    let mut running = start(vec![source(&gateway, model.map)]);
    for _ in 0..3 {
        assert_eq!(meters_in(&running.next().await), [id(1_000), id(1_002)]);
    }
    gateway.heal();
    running
        .until("the failing meter to come back", |b| {
            meters_in(b).len() == 3
        })
        .await;
    // An exception is an answer: the connection stays.
    assert_eq!(gateway.accepts(), 1);
}

#[tokio::test]
async fn a_meter_that_never_answers_does_not_drop_the_others() {
    let model = MODELS[2];
    let gateway = Gateway::start().await;
    for slot in 0..3 {
        gateway.meter(model, slot, 2_000 + u32::from(slot), 7);
    }
    let mut running = start(vec![source(&gateway, model.map)]);
    assert_eq!(running.next().await.len(), 3);
    gateway.fail(Gateway::energy_range(model, 1), Fault::Hang);
    running.drain();
    // After the timeout the connection is opened again within the same poll, and the meter
    // after the silent one is still read.
    for _ in 0..3 {
        let batch = running
            .until("a poll after the fault", |b| {
                !meters_in(b).contains(&id(2_001))
            })
            .await;
        assert_eq!(meters_in(&batch), [id(2_000), id(2_002)]);
    }
    assert!(gateway.accepts() >= 3, "{} connections", gateway.accepts());
}

#[tokio::test]
async fn one_connection_serves_every_poll() {
    let model = MODELS[0];
    let gateway = Gateway::start().await;
    gateway.meter(model, 0, 42, 1);
    gateway.meter(model, 1, 43, 2);
    let mut running = start(vec![source(&gateway, model.map)]);
    for _ in 0..10 {
        assert_eq!(running.next().await.len(), 2);
    }
    assert_eq!(gateway.accepts(), 1);
    // Discovery (2 serials and the empty slot) and 10 polls of 2 meters, 2 reads each for SEC.
    assert!(gateway.requests() >= 3 + 10 * 4, "{}", gateway.requests());
}

#[tokio::test]
async fn a_restarted_gateway_is_read_again() {
    let model = MODELS[1];
    let mut gateway = Gateway::start().await;
    gateway.meter(model, 0, 4_242, 100);
    let mut running = start(vec![source(&gateway, model.map)]);
    running.next().await;
    gateway.stop().await;
    // While the gateway is down the source keeps trying to connect: a bare listener on its
    // port sees the attempt (and closes it at once).
    let listener = TcpListener::bind(gateway.addr).await.unwrap();
    let attempt = tokio::time::timeout(crate::PATIENCE, listener.accept()).await;
    drop(attempt.expect("a reconnection attempt").unwrap());
    drop(listener);
    gateway.set(model.base, &[0, 0, 0, 101]);
    gateway.restart().await;
    running
        .until("readings from the restarted gateway", |b| {
            values(b, Channel::EnergyImport) == [(id(4_242), 101 * model.factor)]
        })
        .await;
    assert_eq!(gateway.accepts(), 2);
}

#[tokio::test]
async fn polls_never_overlap_and_each_meter_has_its_own_time() {
    // Time is the subject here: a real slow server.
    let model = MODELS[1];
    let gateway = Gateway::start().await;
    for slot in 0..3 {
        gateway.meter(model, slot, 3_000 + u32::from(slot), 1);
    }
    let mut running = start(vec![source(&gateway, model.map)]);
    running.next().await;
    gateway.slow_down(Duration::from_millis(150));
    running.drain();
    let mut batches = Vec::new();
    while batches.len() < 4 {
        let batch = running.next().await;
        if batch.len() == 3 {
            batches.push(batch);
        }
    }
    // One request at a time, though the interval (100 ms) is shorter than a poll (450 ms).
    assert_eq!(gateway.max_in_flight(), 1);
    for batch in &batches {
        // Meters are read one after another and each is stamped when it was read.
        for pair in batch.windows(2) {
            assert!(pair[1].ts_ms - pair[0].ts_ms >= 100, "{batch:?}");
        }
    }
    for pair in batches.windows(2) {
        let end = pair[0].last().unwrap().ts_ms;
        let next = pair[1].first().unwrap().ts_ms;
        assert!(
            next - end >= 100,
            "a poll began before the previous one ended"
        );
    }
}

#[tokio::test]
async fn replaced_and_added_meters_are_discovered() {
    let model = MODELS[2];
    let gateway = Gateway::start().await;
    gateway.meter(model, 0, 500, 1);
    gateway.meter(model, 1, 501, 1);
    let config = ModbusSourceConfig {
        rediscover_every: Duration::from_secs(1),
        ..source(&gateway, model.map)
    };
    let mut running = start(vec![config]);
    assert_eq!(meters_in(&running.next().await), [id(500), id(501)]);
    // The meter in slot 1 is swapped: its readings must never go out under the old serial.
    gateway.meter(model, 1, 601, 9);
    let batch = running
        .until("the new meter", |b| meters_in(b).contains(&id(601)))
        .await;
    assert_eq!(meters_in(&batch), [id(500), id(601)]);
    // A meter added in the empty slot 2 is found by the next scheduled discovery.
    gateway.meter(model, 2, 602, 3);
    running
        .until("the added meter", |b| meters_in(b).contains(&id(602)))
        .await;
    let batch = running.next().await;
    assert_eq!(meters_in(&batch), [id(500), id(601), id(602)]);
}
