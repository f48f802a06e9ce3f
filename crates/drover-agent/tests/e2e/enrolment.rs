//! Who the device is to the hub: enrolment (accepted at once, or pending until an operator
//! accepts it), enrolling again when the hub refuses the credential, fetching a release key the
//! fleet got later, revocation, and the floor under the poll interval.

use std::fs;
use std::time::{Duration, Instant};

use drover_protocol::device::Module;
use drover_test_support::{CuttingProxy, Engine, TestHub, wait_until};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::common::{Device, Fleet, PATIENCE, marker_script, script_release};

const CHECKIN: &str = "/device/v1/checkin";
const ENROL: &str = "/device/v1/enroll";

#[tokio::test]
async fn a_pending_device_keeps_polling_and_updates_once_an_operator_accepts_it() {
    let hub = TestHub::start(Engine::Sqlite).await.unwrap().unwrap();
    let fleet = Fleet::on(hub, false).await;
    let proxy = CuttingProxy::forward(fleet.hub.hub.addr).await.unwrap();
    let device = Device::via(&fleet, &proxy);
    let ran = device.path("ran");
    fleet
        .deploy(
            "1.0",
            Module::Script,
            &script_release(&marker_script(&ran, "ran")),
        )
        .await;
    let agent = device.start();
    let id = device.wait_enrolled().await;
    let listed = fleet.devices().await;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["id"], id.as_str());
    assert_eq!(listed[0]["status"], "pending");
    wait_until(PATIENCE, "two refused check-ins", || async {
        (proxy.count("POST", CHECKIN) >= 2).then_some(())
    })
    .await;
    assert!(!ran.exists(), "nothing is installed before acceptance");
    assert!(fleet.attempts(&id).await.is_empty());
    assert_eq!(device.status().current_release, None);

    let accepted = fleet.act(&id, "accept").await;
    assert_eq!(accepted["status"], "accepted");
    fleet.wait_current(&id, "1.0").await;
    agent.stop().await;
    assert_eq!(fs::read_to_string(&ran).unwrap(), "ran\n");
    assert_eq!(proxy.count("POST", ENROL), 1, "enrolled once");
    assert_eq!(fleet.devices().await.len(), 1);
}

#[tokio::test]
async fn a_refused_credential_enrols_again_with_the_same_identity() {
    let fleet = Fleet::sqlite().await;
    let proxy = CuttingProxy::forward(fleet.hub.hub.addr).await.unwrap();
    let device = Device::via(&fleet, &proxy);
    let agent = device.start();
    let id = device.wait_enrolled().await;
    fleet.wait_checkins(&id, 1).await;
    agent.stop().await;
    // As if the state directory came back from an old backup: the hub no longer knows it.
    let credential = device.config.state_dir.join("credential");
    fs::write(&credential, "drv_d_restoredfromanoldbackup\n").unwrap();

    let agent = device.start();
    fleet.wait_checkins(&id, 2).await;
    agent.stop().await;
    assert_eq!(proxy.count("POST", ENROL), 2);
    assert_eq!(device.status().device_id.as_deref(), Some(id.as_str()));
    let devices = fleet.devices().await;
    assert_eq!(devices.len(), 1, "the same device, not a new one");
    assert_eq!(devices[0]["id"], id.as_str());
    assert!(!fs::read_to_string(credential).unwrap().contains("restored"));
}

#[tokio::test]
async fn a_release_key_given_to_the_fleet_after_enrolment_is_fetched() {
    let hub = TestHub::start(Engine::Sqlite).await.unwrap().unwrap();
    let fleet = Fleet::without_release_key(hub).await;
    let proxy = CuttingProxy::forward(fleet.hub.hub.addr).await.unwrap();
    let device = Device::via(&fleet, &proxy);
    let agent = device.start();
    let id = device.wait_enrolled().await;
    fleet.wait_checkins(&id, 1).await;

    let (status, body) = fleet
        .api
        .patch(
            "/api/v1/fleets/lab",
            json!({"release_key": fleet.key.public().to_string()}),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let ran = device.path("ran");
    fleet
        .deploy(
            "9.0",
            Module::Script,
            &script_release(&marker_script(&ran, "ran")),
        )
        .await;
    fleet.wait_current(&id, "9.0").await;
    agent.stop().await;
    assert_eq!(proxy.count("POST", ENROL), 2, "enrolled again for the key");
    let attempts = fleet.attempts(&id).await;
    assert_eq!(attempts.len(), 1, "no attempt failed for want of a key");
    assert_eq!(attempts[0].state, "success");
    assert_eq!(fleet.devices().await.len(), 1);
}

#[tokio::test]
async fn a_revoked_device_stops_updating_and_asks_only_at_the_max_interval() {
    let fleet = Fleet::sqlite().await;
    let proxy = CuttingProxy::forward(fleet.hub.hub.addr).await.unwrap();
    let mut device = Device::via(&fleet, &proxy);
    device.config.poll.max_interval = Duration::from_millis(600);
    let ran = device.path("ran");
    fleet
        .deploy(
            "1.0",
            Module::Script,
            &script_release(&marker_script(&ran, "1.0")),
        )
        .await;
    let agent = device.start();
    let id = device.wait_enrolled().await;
    fleet.wait_current(&id, "1.0").await;

    let revoked = fleet.act(&id, "revoke").await;
    assert_eq!(revoked["status"], "revoked");
    let since = Instant::now();
    fleet
        .deploy(
            "2.0",
            Module::Script,
            &script_release(&marker_script(&ran, "2.0")),
        )
        .await;
    let refused = || {
        proxy
            .requests()
            .into_iter()
            .filter(|r| r.method == "POST" && r.path == CHECKIN && r.at > since)
            .map(|r| r.at)
            .collect::<Vec<_>>()
    };
    wait_until(PATIENCE, "four refused check-ins", || async {
        (refused().len() >= 4).then_some(())
    })
    .await;
    agent.stop().await;

    for pair in refused().windows(2) {
        let gap = pair[1].duration_since(pair[0]);
        // 600 ms jittered by at most 10 %.
        assert!(
            gap >= Duration::from_millis(530),
            "asked again after {gap:?}"
        );
    }
    assert_eq!(
        proxy.count("POST", ENROL),
        1,
        "a revoked device never enrols again"
    );
    assert_eq!(
        proxy.count("GET", "/device/v1/artifacts/"),
        1,
        "only 1.0 was fetched"
    );
    assert_eq!(fs::read_to_string(&ran).unwrap(), "1.0\n");
    assert_eq!(device.status().current_release.as_deref(), Some("1.0"));
    let view = fleet.device(&id).await;
    assert_eq!(view["status"], "revoked");
    assert_eq!(view["current_release"], "1.0");
    assert!(fleet.attempts_at(&id, "2.0").await.is_empty());
}

#[tokio::test]
async fn the_poll_interval_never_drops_below_min_interval() {
    let fleet = Fleet::sqlite().await;
    let proxy = CuttingProxy::forward(fleet.hub.hub.addr).await.unwrap();
    let mut device = Device::via(&fleet, &proxy);
    // The hub asks for 1 s (the shortest it can); the device's floor is longer.
    device.config.poll.min_interval = Duration::from_millis(1200);
    device.config.poll.max_interval = Duration::from_secs(5);
    let agent = device.start();
    let checkins = || {
        proxy
            .requests()
            .into_iter()
            .filter(|r| r.method == "POST" && r.path == CHECKIN)
            .map(|r| r.at)
            .collect::<Vec<_>>()
    };
    wait_until(PATIENCE, "four check-ins", || async {
        (checkins().len() >= 4).then_some(())
    })
    .await;
    agent.stop().await;
    for pair in checkins().windows(2) {
        let gap = pair[1].duration_since(pair[0]);
        assert!(
            gap >= Duration::from_millis(1180),
            "check-ins {gap:?} apart"
        );
    }
}

#[tokio::test]
async fn without_a_provisioning_key_an_unenrolled_agent_says_so() {
    let fleet = Fleet::sqlite().await;
    let mut device = Device::new(&fleet);
    device.config.provisioning_key = None;
    let err = drover_agent::run(device.config.clone(), CancellationToken::new())
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("provisioning_key"), "{err:#}");
    assert!(fleet.devices().await.is_empty());
}
