//! The whole agent ([`crate::run`]) against the fake hub in `testhub`: enrolment, check-ins,
//! signed updates, resumed downloads, refusals, the outbox, and poll timing.

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::time::Duration;

use drover_protocol::device::{DesiredState, DeviceStatus, Module, UpdatePhase};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{AgentConfig, AppConfig, PollConfig, RetryConfig, Secret};
use crate::testhub::FakeHub;
use crate::testutil::{Entry, wait_until, write_tar_gz};

fn config(hub: &FakeHub, dir: &Path) -> AgentConfig {
    AgentConfig {
        hub_url: hub.url.clone(),
        provisioning_key: Some(Secret::new("drv_p_test")),
        state_dir: dir.join("state"),
        device_type: "test-device".into(),
        tags: vec!["lab".into()],
        poll: PollConfig {
            min_interval: Duration::from_millis(100),
            max_interval: Duration::from_secs(2),
            default_interval: Duration::from_millis(200),
            error_backoff_max: Duration::from_secs(1),
        },
        retry: RetryConfig {
            base: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
            max_failures: 2,
        },
        app: AppConfig {
            health_window: Duration::from_secs(5),
            health_interval: Duration::from_millis(50),
            ..AppConfig::default()
        },
        ..AgentConfig::default()
    }
}

struct Running {
    shutdown: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

fn start(config: AgentConfig) -> Running {
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(crate::run(config, shutdown.clone()));
    Running { shutdown, task }
}

impl Running {
    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
    }
}

/// A script release that writes `marker` into `dir` when it runs.
fn script_release(dir: &Path, marker: &str) -> Vec<u8> {
    let path = dir.join(format!("{marker}.tar.gz"));
    let body = format!(
        "#!/bin/sh\necho \"$config\" > {}\necho installed {marker}\n",
        dir.join(marker).display()
    );
    write_tar_gz(
        &path,
        &[Entry::File("release/update.sh", body.as_bytes(), 0o755)],
    );
    fs::read(path).unwrap()
}

fn last_checkin_current(hub: &FakeHub) -> Option<String> {
    hub.state()
        .checkins
        .last()
        .and_then(|(_, c)| c.current_release.clone())
}

#[tokio::test]
async fn enrols_checks_in_and_installs_a_signed_script_release() {
    let hub = FakeHub::start().await;
    let dir = tempfile::tempdir().unwrap();
    hub.deploy("1.0", Module::Script, &script_release(dir.path(), "ran"));
    let config = config(&hub, dir.path());
    let state_dir = config.state_dir.clone();
    let agent = start(config);

    wait_until("the success report", || {
        hub.report_states("1.0").contains(&"success")
    })
    .await;
    wait_until("a check-in with the new release", || {
        last_checkin_current(&hub).as_deref() == Some("1.0")
    })
    .await;
    agent.stop().await;

    assert_eq!(
        fs::read_to_string(dir.path().join("ran")).unwrap(),
        "{\"greeting\":\"hello\"}\n"
    );
    assert_eq!(
        hub.report_states("1.0"),
        vec!["downloading", "installing", "success"]
    );
    let state = hub.state();
    assert_eq!(state.enrolments, 1);
    let first = &state.checkins[0].1;
    let facts = first.facts.as_ref().expect("facts on the first check-in");
    assert_eq!(facts.tags, vec!["lab".to_string()]);
    assert!(
        state
            .checkins
            .iter()
            .skip(1)
            .any(|(_, c)| c.facts.is_none()),
        "not on every check-in"
    );
    let success = state
        .reports
        .iter()
        .find(|r| r.state.as_str() == "success")
        .unwrap();
    assert_eq!(success.output.as_deref(), Some("installed ran\n"));
    drop(state);
    for (file, mode) in [("identity.key", 0o600), ("credential", 0o600)] {
        let meta = fs::metadata(state_dir.join(file)).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, mode, "{file}");
    }
    let status = crate::status(&state_dir).unwrap();
    assert_eq!(status.device_id.as_deref(), Some("testdevice"));
    assert_eq!(status.current_release.as_deref(), Some("1.0"));
    assert_eq!(status.update.phase, UpdatePhase::Idle);
    assert_eq!(status.pending_reports, 0);
}

#[tokio::test]
async fn an_app_release_is_installed_behind_the_current_symlink() {
    let hub = FakeHub::start().await;
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("app.tar.gz");
    write_tar_gz(&archive, &[Entry::File("VERSION", b"2.0", 0o644)]);
    hub.deploy("2.0", Module::App, &fs::read(&archive).unwrap());
    let mut config = config(&hub, dir.path());
    config.app.start = Some("touch started".into());
    config.app.health = Some("test -f started".into());
    let app_root = config.app_root();
    let agent = start(config);

    wait_until("the success report", || {
        hub.report_states("2.0").contains(&"success")
    })
    .await;
    agent.stop().await;

    let current = app_root.join("current");
    assert_eq!(fs::read_link(&current).unwrap(), Path::new("releases/2.0"));
    assert_eq!(fs::read_to_string(current.join("VERSION")).unwrap(), "2.0");
    assert!(current.join("started").exists());
}

#[tokio::test]
async fn a_cut_download_resumes_with_a_range_request() {
    let hub = FakeHub::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut script = b"#!/bin/sh\necho big\n".to_vec();
    script.extend(std::iter::repeat_n(b'#', 200_000));
    script.push(b'\n');
    hub.deploy("1.1", Module::Script, &script);
    hub.state().cut_next_download_after = Some(50_000);
    let agent = start(config(&hub, dir.path()));

    wait_until("the success report", || {
        hub.report_states("1.1").contains(&"success")
    })
    .await;
    agent.stop().await;

    let ranges = hub.state().artifact_ranges.clone();
    assert_eq!(
        ranges[0], None,
        "the first request is for the whole artifact"
    );
    let resumed = ranges[1].as_deref().unwrap_or_default();
    let offset: u64 = resumed
        .strip_prefix("bytes=")
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(offset > 0 && offset <= 50_000, "{ranges:?}");
    assert!(
        !hub.report_states("1.1").contains(&"failure"),
        "a cut is not a failed attempt"
    );
}

#[tokio::test]
async fn a_wrong_hash_is_refused_then_held_without_looping() {
    let hub = FakeHub::start().await;
    let dir = tempfile::tempdir().unwrap();
    let offer = hub.deploy(
        "3.0",
        Module::Script,
        &script_release(dir.path(), "must-not-run"),
    );
    {
        // The hub (or a network path) serves different bytes of the same size.
        let mut state = hub.state();
        let bytes = state.artifacts.get_mut(&offer.sha256).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
    }
    let agent = start(config(&hub, dir.path()));

    wait_until("the held report", || {
        hub.report_states("3.0").contains(&"held")
    })
    .await;
    let downloads = hub.state().artifact_ranges.len();
    let checkins = hub.state().checkins.len();
    wait_until("five more check-ins", || {
        hub.state().checkins.len() >= checkins + 5
    })
    .await;
    agent.stop().await;

    assert!(
        !dir.path().join("must-not-run").exists(),
        "nothing unverified ran"
    );
    assert_eq!(downloads, 2, "one download per attempt, two attempts");
    assert_eq!(
        hub.state().artifact_ranges.len(),
        downloads,
        "no retry once held"
    );
    assert_eq!(
        hub.report_states("3.0"),
        vec!["downloading", "failure", "downloading", "failure", "held"]
    );
    let state = hub.state();
    let failure = state
        .reports
        .iter()
        .find(|r| r.state.as_str() == "failure")
        .unwrap();
    assert!(
        failure.message.as_deref().unwrap().contains("sha256"),
        "{failure:?}"
    );
    let update = &state.checkins.last().unwrap().1.update;
    assert_eq!(update.phase, UpdatePhase::Held);
    assert_eq!(update.failures, 2);
    assert!(update.message.as_deref().unwrap().contains("sha256"));
}

#[tokio::test]
async fn a_wrong_signature_is_refused_before_downloading() {
    let hub = FakeHub::start().await;
    let dir = tempfile::tempdir().unwrap();
    let bytes = script_release(dir.path(), "must-not-run");
    hub.deploy("4.0", Module::Script, &bytes);
    {
        let mut state = hub.state();
        let desired = state.desired.as_mut().unwrap();
        let release = desired.release.as_mut().unwrap();
        let other = drover_protocol::signing::ReleaseSigningKey::generate();
        release.signature = release.manifest().sign(&other);
    }
    let agent = start(config(&hub, dir.path()));

    wait_until("the failure report", || {
        hub.report_states("4.0").contains(&"failure")
    })
    .await;
    agent.stop().await;

    assert!(
        hub.state().artifact_ranges.is_empty(),
        "no byte was downloaded"
    );
    let state = hub.state();
    let failure = state
        .reports
        .iter()
        .find(|r| r.state.as_str() == "failure")
        .unwrap();
    assert!(
        failure.message.as_deref().unwrap().contains("signature"),
        "{failure:?}"
    );
}

#[tokio::test]
async fn a_pending_device_keeps_polling_and_updates_once_accepted() {
    let hub = FakeHub::start().await;
    let dir = tempfile::tempdir().unwrap();
    hub.state().status = DeviceStatus::Pending;
    hub.deploy("1.0", Module::Script, &script_release(dir.path(), "ran"));
    let agent = start(config(&hub, dir.path()));

    wait_until("two refused check-ins", || hub.state().refused >= 2).await;
    assert!(hub.state().checkins.is_empty());
    hub.state().status = DeviceStatus::Accepted;
    wait_until("the success report", || {
        hub.report_states("1.0").contains(&"success")
    })
    .await;
    agent.stop().await;
    assert_eq!(hub.state().enrolments, 1);
}

#[tokio::test]
async fn reports_wait_in_the_outbox_until_the_hub_takes_them_in_order() {
    let hub = FakeHub::start().await;
    let dir = tempfile::tempdir().unwrap();
    hub.deploy("1.0", Module::Script, &script_release(dir.path(), "ran"));
    hub.state().refuse_reports_with = Some(503);
    let config = config(&hub, dir.path());
    let state_dir = config.state_dir.clone();
    let agent = start(config);

    wait_until("a check-in with the new release", || {
        last_checkin_current(&hub).as_deref() == Some("1.0")
    })
    .await;
    assert!(hub.state().reports.is_empty());
    assert_eq!(crate::status(&state_dir).unwrap().pending_reports, 3);
    hub.state().refuse_reports_with = None;
    wait_until("the success report", || {
        hub.report_states("1.0").contains(&"success")
    })
    .await;
    agent.stop().await;

    let state = hub.state();
    let seqs: Vec<u64> = state.reports.iter().map(|r| r.seq).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    assert_eq!(
        hub_states(&state.reports),
        vec!["downloading", "installing", "success"]
    );
    drop(state);
    assert_eq!(crate::status(&state_dir).unwrap().pending_reports, 0);
}

fn hub_states(reports: &[drover_protocol::device::UpdateReport]) -> Vec<&'static str> {
    reports.iter().map(|r| r.state.as_str()).collect()
}

#[tokio::test]
async fn a_hub_interval_of_zero_still_waits_min_interval() {
    let hub = FakeHub::start().await;
    let dir = tempfile::tempdir().unwrap();
    hub.state().desired = Some(DesiredState {
        etag: "e0".into(),
        poll_interval_s: 0,
        release: None,
        config: serde_json::Value::Null,
        retry_generation: 0,
    });
    let mut config = config(&hub, dir.path());
    config.poll.min_interval = Duration::from_millis(250);
    let agent = start(config);

    wait_until("six check-ins", || hub.state().checkins.len() >= 6).await;
    agent.stop().await;

    let times: Vec<_> = hub.state().checkins.iter().map(|(t, _)| *t).collect();
    for pair in times.windows(2) {
        let gap = pair[1].duration_since(pair[0]);
        assert!(gap >= Duration::from_millis(240), "check-ins {gap:?} apart");
    }
}

#[tokio::test]
async fn a_refused_credential_enrols_again_with_the_same_identity() {
    let hub = FakeHub::start().await;
    let dir = tempfile::tempdir().unwrap();
    let agent = start(config(&hub, dir.path()));
    wait_until("a check-in", || !hub.state().checkins.is_empty()).await;
    // The hub forgot the credential (restored from an old backup, say).
    hub.state().credential = Some("drv_d_something_else".into());
    wait_until("a second enrolment", || hub.state().enrolments >= 2).await;
    let seen = hub.state().checkins.len();
    wait_until("check-ins with the new credential", || {
        hub.state().checkins.len() > seen
    })
    .await;
    agent.stop().await;
}

#[tokio::test]
async fn a_revoked_device_asks_only_at_the_max_interval_and_never_enrols_again() {
    let hub = FakeHub::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(&hub, dir.path());
    config.poll.max_interval = Duration::from_millis(1500);
    let agent = start(config);
    wait_until("a check-in", || !hub.state().checkins.is_empty()).await;
    hub.state().status = DeviceStatus::Revoked;
    wait_until("three refused check-ins", || {
        hub.state().refused_at.len() >= 3
    })
    .await;
    agent.stop().await;

    let state = hub.state();
    assert_eq!(state.enrolments, 1);
    let times = &state.refused_at;
    for pair in times.windows(2) {
        let gap = pair[1].duration_since(pair[0]);
        assert!(
            gap >= Duration::from_millis(1300),
            "asked again after {gap:?}"
        );
    }
}

#[tokio::test]
async fn without_a_provisioning_key_an_unenrolled_agent_says_so() {
    let hub = FakeHub::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(&hub, dir.path());
    config.provisioning_key = None;
    let err = crate::run(config, CancellationToken::new())
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("provisioning_key"), "{err:#}");
}

#[tokio::test]
async fn an_operator_retry_releases_a_held_release() {
    let hub = FakeHub::start().await;
    let dir = tempfile::tempdir().unwrap();
    let fixed = dir.path().join("fixed");
    let archive = dir.path().join("a.tar.gz");
    let body = format!(
        "#!/bin/sh\nif [ ! -f {} ]; then echo not yet >&2; exit 1; fi\n",
        fixed.display()
    );
    write_tar_gz(
        &archive,
        &[Entry::File("update.sh", body.as_bytes(), 0o755)],
    );
    hub.deploy("8.0", Module::Script, &fs::read(&archive).unwrap());
    let agent = start(config(&hub, dir.path()));

    wait_until("the held report", || {
        hub.report_states("8.0").contains(&"held")
    })
    .await;
    fs::write(&fixed, b"").unwrap();
    {
        let mut state = hub.state();
        let desired = state.desired.as_mut().unwrap();
        desired.retry_generation += 1;
        desired.etag.push_str("-retry");
    }
    wait_until("the success report", || {
        hub.report_states("8.0").contains(&"success")
    })
    .await;
    agent.stop().await;

    let state = hub.state();
    let attempts: Vec<u32> = state
        .reports
        .iter()
        .filter(|r| r.state.is_final())
        .map(|r| r.attempt)
        .collect();
    assert_eq!(
        attempts,
        vec![1, 2, 2, 1],
        "counts start again after the retry"
    );
}

#[tokio::test]
async fn a_release_key_given_to_the_fleet_after_enrolment_is_fetched() {
    let hub = FakeHub::start().await;
    let dir = tempfile::tempdir().unwrap();
    hub.state().release_key = None;
    let agent = start(config(&hub, dir.path()));
    wait_until("a check-in", || !hub.state().checkins.is_empty()).await;
    hub.state().release_key = Some(hub.key.public().to_string());
    hub.deploy("9.0", Module::Script, &script_release(dir.path(), "ran"));
    wait_until("the success report", || {
        hub.report_states("9.0").contains(&"success")
    })
    .await;
    agent.stop().await;
    assert_eq!(hub.state().enrolments, 2);
    assert!(!hub.report_states("9.0").contains(&"failure"));
}

#[tokio::test]
async fn a_retry_generation_saved_just_before_a_crash_still_releases_the_hold() {
    let hub = FakeHub::start().await;
    let dir = tempfile::tempdir().unwrap();
    let offer = hub.deploy("10.0", Module::Script, &script_release(dir.path(), "ran"));
    let desired = {
        let mut state = hub.state();
        let desired = state.desired.as_mut().unwrap();
        desired.retry_generation = 1;
        desired.clone()
    };
    let config = config(&hub, dir.path());
    let paths = crate::layout::StateDir::new(&config.state_dir);
    paths.create().unwrap();
    // The crash came after desired.json was written and before state.json forgot the failures.
    crate::fsutil::write_json_atomic(&paths.desired_json(), &desired, 0o644).unwrap();
    let held = crate::update::state::UpdateState {
        failures: Some(crate::update::state::FailureRecord {
            release: offer.version.clone(),
            failures: 2,
            retry_at_ms: 0,
            held: true,
            last_error: "boom".into(),
        }),
        retry_generation: 0,
        ..Default::default()
    };
    crate::fsutil::write_json_atomic(&paths.state_json(), &held, 0o644).unwrap();
    fs::create_dir_all(paths.work_dir().join("old-leftover")).unwrap();
    fs::write(paths.downloads_dir().join("f".repeat(64)), b"stale").unwrap();
    let agent = start(config);

    wait_until("the success report", || {
        hub.report_states("10.0").contains(&"success")
    })
    .await;
    agent.stop().await;
    assert!(!paths.work_dir().join("old-leftover").exists());
    assert!(!paths.downloads_dir().join("f".repeat(64)).exists());
    // The hub answered every check-in with 204: the agent already had this desired state.
    assert!(
        hub.state()
            .checkins
            .iter()
            .all(|(_, c)| c.desired_etag.is_some())
    );
}
