//! Updates that must not install: a signature made with another key, an artifact whose bytes
//! changed on the hub, an `update.sh` that fails, an app release that never becomes healthy.
//! Each is reported with its reason (and output), nothing unverified runs, and a failing
//! release is retried with backoff, then held until an operator asks for a retry.

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::time::Duration;

use drover_agent::layout::StateDir;
use drover_protocol::device::Module;
use drover_protocol::signing::ReleaseSigningKey;
use drover_test_support::{CuttingProxy, tar_gz};
use serde_json::{Value, json};

use crate::common::{Device, Fleet, final_states, marker_script, script_release};

const DOWNLOADS: &str = "/device/v1/artifacts/";

#[tokio::test]
async fn a_release_signed_with_another_key_is_refused_before_a_byte_is_downloaded() {
    let fleet = Fleet::sqlite().await;
    let proxy = CuttingProxy::forward(fleet.hub.hub.addr).await.unwrap();
    let mut device = Device::via(&fleet, &proxy);
    // The device pins a key that is not the fleet's.
    device.config.release_key = Some(ReleaseSigningKey::generate().public().to_string());
    let ran = device.path("ran");
    fleet
        .deploy(
            "4.0",
            Module::Script,
            &script_release(&marker_script(&ran, "ran")),
        )
        .await;
    let agent = device.start();
    let id = device.wait_enrolled().await;
    let view = fleet
        .wait_device(&id, "the release to be held", |d| {
            d["update"]["phase"] == "held"
        })
        .await;
    agent.stop().await;

    assert!(!ran.exists(), "nothing unverified ran");
    assert_eq!(proxy.count("GET", DOWNLOADS), 0, "nothing was downloaded");
    let attempts = fleet.attempts_at(&id, "4.0").await;
    assert_eq!(
        final_states(&attempts),
        vec!["failure", "failure", "failure", "held"]
    );
    for attempt in &attempts {
        let why = attempt.message_of("failure");
        assert!(why.contains("signature"), "{why}");
    }
    assert!(
        view["update"]["message"]
            .as_str()
            .unwrap()
            .contains("signature"),
        "{view}"
    );
    assert_eq!(view["current_release"], Value::Null);
}

#[tokio::test]
async fn an_artifact_changed_on_the_hub_is_refused_then_held_without_looping() {
    let fleet = Fleet::sqlite().await;
    let proxy = CuttingProxy::forward(fleet.hub.hub.addr).await.unwrap();
    let mut device = Device::via(&fleet, &proxy);
    device.config.retry.max_failures = 2;
    let ran = device.path("ran");
    let artifact = script_release(&marker_script(&ran, "ran"));
    fleet.deploy("3.0", Module::Script, &artifact).await;
    // The stored file gets other bytes of the same length (a bad disk, a tampered store).
    let stored = fleet.artifact_file(&drover_protocol::ids::sha256_hex(&artifact));
    let mut perms = fs::metadata(&stored).unwrap().permissions();
    perms.set_mode(0o644);
    fs::set_permissions(&stored, perms).unwrap();
    let mut tampered = artifact.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 0xff;
    fs::write(&stored, &tampered).unwrap();

    let agent = device.start();
    let id = device.wait_enrolled().await;
    let view = fleet
        .wait_device(&id, "the release to be held", |d| {
            d["update"]["phase"] == "held"
        })
        .await;
    let downloads = proxy.count("GET", DOWNLOADS);
    fleet.wait_checkins(&id, 5).await;
    agent.stop().await;

    assert!(!ran.exists(), "nothing unverified ran");
    assert_eq!(downloads, 2, "one download per attempt, two attempts");
    assert_eq!(
        proxy.count("GET", DOWNLOADS),
        downloads,
        "no retry once held"
    );
    let attempts = fleet.attempts_at(&id, "3.0").await;
    let states: Vec<Vec<&str>> = attempts.iter().map(|a| a.states()).collect();
    assert_eq!(
        states,
        vec![
            vec!["downloading", "failure"],
            vec!["downloading", "failure", "held"],
        ]
    );
    let why = attempts[0].message_of("failure");
    assert!(why.contains("sha256"), "{why}");
    assert_eq!(view["update"]["failures"], 2);
    assert!(
        view["update"]["message"]
            .as_str()
            .unwrap()
            .contains("sha256"),
        "{view}"
    );
    let downloads_dir = StateDir::new(&device.config.state_dir).downloads_dir();
    assert_eq!(
        fs::read_dir(downloads_dir).unwrap().count(),
        0,
        "nothing kept"
    );
}

#[tokio::test]
async fn a_failing_update_sh_is_reported_with_its_output_held_and_retried_on_request() {
    let fleet = Fleet::sqlite().await;
    let device = Device::new(&fleet);
    let fixed = device.path("fixed");
    let body = format!(
        "#!/bin/sh\nif [ ! -f {} ]; then echo step 1; echo disk full >&2; exit 3; fi\necho fixed now\n",
        fixed.display()
    );
    fleet
        .deploy("8.0", Module::Script, &script_release(&body))
        .await;
    let agent = device.start();
    let id = device.wait_enrolled().await;
    let view = fleet
        .wait_device(&id, "the release to be held", |d| {
            d["update"]["phase"] == "held"
        })
        .await;
    assert_eq!(view["update"]["release"], "8.0");
    assert_eq!(view["update"]["failures"], 3);
    let held = fleet.attempts_at(&id, "8.0").await;
    assert_eq!(held.len(), 3, "exactly max_failures attempts: {held:?}");
    for (n, attempt) in held.iter().enumerate() {
        assert_eq!(attempt.attempt as usize, n + 1);
        assert_eq!(attempt.output.as_deref(), Some("step 1\ndisk full\n"));
        assert_eq!(
            attempt.message_of("failure"),
            "update.sh exited with code 3"
        );
    }
    assert_eq!(
        final_states(&held),
        vec!["failure", "failure", "failure", "held"]
    );
    let why = held[2].message.as_deref().unwrap();
    assert!(
        why.contains("held until an operator asks for a retry"),
        "{why}"
    );

    // Held: no further attempt, however many check-ins pass.
    fleet.wait_checkins(&id, 5).await;
    let still = fleet.attempts_at(&id, "8.0").await;
    assert_eq!(
        still.iter().map(|a| a.events.len()).sum::<usize>(),
        held.iter().map(|a| a.events.len()).sum::<usize>(),
        "nothing happened while held: {still:?}"
    );
    assert_eq!(device.status().current_release, None);

    fs::write(&fixed, b"").unwrap();
    fleet.act(&id, "retry").await;
    fleet.wait_current(&id, "8.0").await;
    agent.stop().await;
    let attempts = fleet.attempts_at(&id, "8.0").await;
    let numbers: Vec<u32> = attempts.iter().map(|a| a.attempt).collect();
    assert_eq!(numbers, vec![1, 2, 3, 4], "a retry is a new attempt");
    assert_eq!(
        attempts[3].states(),
        vec!["downloading", "installing", "success"]
    );
    assert_eq!(attempts[3].output.as_deref(), Some("fixed now\n"));
    let view = fleet.device(&id).await;
    assert_eq!(view["update"]["phase"], "idle");
}

#[tokio::test]
async fn a_failing_health_check_is_rolled_back_to_the_previous_release() {
    let fleet = Fleet::sqlite().await;
    let mut device = Device::new(&fleet);
    let log = device.path("commands.log");
    device.config.app.stop = Some(format!("echo stop $DROVER_RELEASE >> {}", log.display()));
    device.config.app.start = Some(format!("echo start $DROVER_RELEASE >> {}", log.display()));
    device.config.app.health =
        Some("if [ -f unhealthy ]; then echo port 8080 refused; exit 1; fi".into());
    // Long enough that a check started under a loaded machine still finishes (and its output
    // is kept): each check may take the rest of the window, at least a second.
    device.config.app.health_window = Duration::from_secs(2);
    // One try only, so the attempt ends rolled back rather than retried.
    device.config.retry.base = Duration::from_secs(3600);
    device.config.retry.max_backoff = Duration::from_secs(3600);
    fleet
        .deploy("1", Module::App, &tar_gz(&[("VERSION", b"1", 0o644)]))
        .await;
    let agent = device.start();
    let id = device.wait_enrolled().await;
    fleet.wait_current(&id, "1").await;
    fleet
        .deploy(
            "2",
            Module::App,
            &tar_gz(&[("VERSION", b"2", 0o644), ("unhealthy", b"", 0o644)]),
        )
        .await;
    let attempts = fleet
        .wait_attempts(&id, "the rollback report", |a| {
            final_states(a).contains(&"rolled_back".to_string())
        })
        .await;
    let view = fleet
        .wait_device(&id, "the device to back off", |d| {
            d["update"]["phase"] == "backing_off"
        })
        .await;
    agent.stop().await;

    let rolled = attempts.iter().find(|a| a.release == "2").unwrap();
    assert_eq!(
        rolled.states(),
        vec!["downloading", "installing", "rolled_back"]
    );
    let why = rolled.message_of("rolled_back");
    assert!(why.contains("health check did not pass"), "{why}");
    assert!(why.contains("release 1 was restored"), "{why}");
    assert!(
        rolled
            .output
            .as_deref()
            .unwrap()
            .contains("port 8080 refused"),
        "{rolled:?}"
    );
    assert_eq!(view["current_release"], "1");
    assert_eq!(device.linked().as_deref(), Some("1"));
    assert_eq!(device.status().current_release.as_deref(), Some("1"));
    assert_eq!(
        fs::read_to_string(&log).unwrap(),
        "start 1\nstop 1\nstart 2\nstop 2\nstart 1\n"
    );
}

#[tokio::test]
async fn a_retry_generation_saved_just_before_a_crash_still_releases_the_hold() {
    let fleet = Fleet::sqlite().await;
    let mut device = Device::new(&fleet);
    device.config.retry.max_failures = 2;
    let fixed = device.path("fixed");
    let body = format!(
        "#!/bin/sh\n[ -f {} ] || {{ echo not yet; exit 1; }}\n",
        fixed.display()
    );
    fleet
        .deploy("10.0", Module::Script, &script_release(&body))
        .await;
    let agent = device.start();
    let id = device.wait_enrolled().await;
    fleet
        .wait_device(&id, "the release to be held", |d| {
            d["update"]["phase"] == "held"
        })
        .await;
    agent.stop().await;

    // The operator asks for a retry while the agent is down. Then the crash: the agent had
    // written the hub's new desired state to desired.json and died before state.json forgot the
    // failures. On restart the hub answers 204 (the etag matches), so only the state directory
    // itself can release the hold.
    fleet.act(&id, "retry").await;
    let paths = StateDir::new(&device.config.state_dir);
    let credential = fs::read_to_string(paths.credential()).unwrap();
    let answer = reqwest::Client::new()
        .post(format!("{}/device/v1/checkin", fleet.hub.url))
        .bearer_auth(credential.trim())
        .json(&json!({
            "protocol": 1,
            "current_release": null,
            "agent_version": drover_agent::AGENT_VERSION,
            "update": {"phase": "held", "release": "10.0", "failures": 2, "message": "not yet"},
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    let desired: Value = answer.json().await.unwrap();
    assert_eq!(desired["release"]["version"], "10.0");
    fs::write(paths.desired_json(), desired.to_string()).unwrap();
    let state: Value = serde_json::from_slice(&fs::read(paths.state_json()).unwrap()).unwrap();
    assert_eq!(state["failures"]["held"], true);
    assert_ne!(state["retry_generation"], desired["retry_generation"]);
    // Leftovers a crash can leave behind are tidied at start.
    fs::create_dir_all(paths.work_dir().join("old-leftover")).unwrap();
    fs::write(paths.downloads_dir().join("f".repeat(64)), b"stale").unwrap();
    fs::write(&fixed, b"").unwrap();

    let agent = device.start();
    fleet.wait_current(&id, "10.0").await;
    agent.stop().await;
    assert!(!paths.work_dir().join("old-leftover").exists());
    assert!(!paths.downloads_dir().join("f".repeat(64)).exists());
    let attempts = fleet.attempts_at(&id, "10.0").await;
    assert_eq!(
        final_states(&attempts),
        vec!["failure", "failure", "held", "success"]
    );
}
