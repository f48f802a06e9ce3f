//! Config-only changes: a new fleet or device config reaches the device without a release.
//! The agent rewrites `<state_dir>/config.json` and runs `[app] reload` in the current release.

use std::fs;

use drover_protocol::device::Module;
use drover_test_support::{tar_gz, wait_until};
use serde_json::json;

use crate::common::{Device, Fleet, PATIENCE, read_json};

#[tokio::test]
async fn a_config_change_without_a_release_rewrites_config_json_and_reloads_the_app() {
    let fleet = Fleet::sqlite().await;
    fleet.set_config(json!({"greeting": "hello"})).await;
    let mut device = Device::new(&fleet);
    let reloads = device.path("reloads.log");
    device.config.app.start = Some(format!(
        "cp \"$DROVER_CONFIG_FILE\" {}",
        device.path("started-with.json").display()
    ));
    // Fails on purpose: a failing reload is logged, never reported as an update.
    device.config.app.reload = Some(format!(
        "echo \"$DROVER_RELEASE $(basename $PWD) $config $(tr -d ' \\n' < $DROVER_CONFIG_FILE)\" >> {}; exit 1",
        reloads.display()
    ));
    fleet
        .deploy("1.0", Module::App, &tar_gz(&[("VERSION", b"1.0", 0o644)]))
        .await;
    let agent = device.start();
    let id = device.wait_enrolled().await;
    fleet.wait_current(&id, "1.0").await;
    let config_file = device.config.state_dir.join("config.json");
    assert_eq!(read_json(&config_file), json!({"greeting": "hello"}));
    assert_eq!(
        read_json(&device.path("started-with.json")),
        json!({"greeting": "hello"})
    );
    assert!(
        !reloads.exists(),
        "the config came with the release: its start command saw it, no reload"
    );

    fleet.set_config(json!({"greeting": "hej"})).await;
    let read_reloads = || fs::read_to_string(&reloads).unwrap_or_default();
    wait_until(PATIENCE, "the reload after the fleet change", || async {
        (read_reloads().lines().count() == 1).then_some(())
    })
    .await;
    assert_eq!(
        read_reloads(),
        "1.0 1.0 {\"greeting\":\"hej\"} {\"greeting\":\"hej\"}\n"
    );
    assert_eq!(read_json(&config_file), json!({"greeting": "hej"}));

    // The device's own config merges over the fleet's.
    let (status, body) = fleet
        .api
        .patch(
            &format!("/api/v1/devices/{id}"),
            json!({"config": {"meter": {"name": "7"}}}),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    wait_until(PATIENCE, "the reload after the device change", || async {
        (read_reloads().lines().count() == 2).then_some(())
    })
    .await;
    let merged = json!({"greeting": "hej", "meter": {"name": "7"}});
    assert_eq!(read_json(&config_file), merged);
    fleet.wait_checkins(&id, 3).await;
    agent.stop().await;

    assert_eq!(read_reloads().lines().count(), 2, "one reload per change");
    let attempts = fleet.attempts(&id).await;
    assert_eq!(attempts.len(), 1, "reloads are not updates: {attempts:?}");
    let view = fleet.device(&id).await;
    assert_eq!(view["current_release"], "1.0");
    assert_eq!(view["update"]["phase"], "idle");
    assert_eq!(device.status().pending_reports, 0);
}
