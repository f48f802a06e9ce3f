//! Tests of the update runner, driven directly: each prepares `state.json` (and the files a
//! crash at that step would leave behind), calls [`drive`], and checks that the device ends
//! consistent: the `current` symlink, `state.json` and the reports all agree.

use std::fs;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use drover_protocol::device::{Module, ReleaseOffer, ReportState, UpdateReport};
use drover_protocol::signing::ReleaseSigningKey;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::runner::{Context, RunEnd, drive};
use super::state::{Attempt, Installed, Outcome, StateStore, Step, UpdateState};
use super::{Plan, plan};
use crate::app::{self, AppLayout};
use crate::client::HubClient;
use crate::config::{AgentConfig, AppConfig, RetryConfig};
use crate::crash::CrashPoints;
use crate::download;
use crate::layout::StateDir;
use crate::outbox::Outbox;
use crate::testutil::{Entry, write_tar_gz};

struct Rig {
    dir: tempfile::TempDir,
    ctx: Context,
    key: ReleaseSigningKey,
}

/// Health passes for every release except those named in `$FAIL_HEALTH` (a file the test writes).
fn app_config(dir: &std::path::Path) -> AppConfig {
    let log = dir.join("commands.log");
    let fail = dir.join("fail-health");
    AppConfig {
        root: None,
        stop: Some(format!("echo stop $DROVER_RELEASE >> {}", log.display())),
        start: Some(format!(
            "echo start $DROVER_RELEASE $(basename \"$PWD\") >> {}",
            log.display()
        )),
        health: Some(format!(
            "if grep -qx \"$DROVER_RELEASE\" {} 2>/dev/null; then echo unhealthy $DROVER_RELEASE; exit 1; fi",
            fail.display()
        )),
        reload: None,
        health_window: Duration::from_millis(300),
        health_interval: Duration::from_millis(50),
        command_timeout: Duration::from_secs(10),
    }
}

impl Rig {
    fn new() -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let config = AgentConfig {
            hub_url: "http://127.0.0.1:9".into(),
            device_type: "test-device".into(),
            state_dir: dir.path().join("state"),
            app: app_config(dir.path()),
            retry: RetryConfig {
                base: Duration::from_secs(60),
                max_backoff: Duration::from_secs(3600),
                max_failures: 2,
            },
            ..AgentConfig::default()
        };
        config.validate().unwrap();
        let paths = StateDir::new(&config.state_dir);
        paths.create().unwrap();
        let key = ReleaseSigningKey::generate();
        let cancel = CancellationToken::new();
        let ctx = Context {
            client: HubClient::new(&config).unwrap(),
            config: Arc::new(config),
            credential: Some("drv_d_x".into()),
            release_key: Some(key.public()),
            store: Arc::new(Mutex::new(StateStore::open(&paths.state_json()).unwrap())),
            outbox: Arc::new(Mutex::new(Outbox::open(&paths.outbox_dir()).unwrap())),
            outbox_changed: Arc::new(Notify::new()),
            crash: CrashPoints::none(),
            cancel_download: cancel.child_token(),
            cancel,
            paths,
        };
        Rig { dir, ctx, key }
    }

    fn layout(&self) -> AppLayout {
        AppLayout::new(self.ctx.config.app_root())
    }

    fn offer(&self, version: &str, module: Module, bytes: &[u8]) -> ReleaseOffer {
        let sha256 = drover_protocol::ids::sha256_hex(bytes);
        let mut offer = ReleaseOffer {
            version: version.into(),
            module,
            device_type: None,
            artifact_url: format!("/device/v1/artifacts/{sha256}"),
            size: bytes.len() as u64,
            sha256,
            signature: String::new(),
        };
        offer.signature = offer.manifest().sign(&self.key);
        offer
    }

    /// Puts a verified artifact in place and records an attempt at `step`.
    fn stage(&self, version: &str, module: Module, bytes: &[u8], step: Step) -> Attempt {
        let offer = self.offer(version, module, bytes);
        let verified = download::verified_path(&self.ctx.paths.downloads_dir(), &offer.sha256);
        fs::write(verified, bytes).unwrap();
        let attempt = Attempt {
            offer,
            config: serde_json::json!({"greeting": "hello"}),
            number: 1,
            old_app: None,
            step,
        };
        self.set(|s| s.attempt = Some(attempt.clone()));
        attempt
    }

    fn set(&self, change: impl FnOnce(&mut UpdateState)) {
        self.ctx.store.lock().unwrap().update(change).unwrap();
    }

    /// What state.json says, read from disk.
    fn state(&self) -> UpdateState {
        StateStore::open(&self.ctx.paths.state_json())
            .unwrap()
            .get()
            .clone()
    }

    fn reports(&self) -> Vec<UpdateReport> {
        self.ctx.outbox.lock().unwrap().pending(1000).unwrap()
    }

    fn report_states(&self) -> Vec<ReportState> {
        self.reports().iter().map(|r| r.state).collect()
    }

    fn commands(&self) -> String {
        fs::read_to_string(self.dir.path().join("commands.log")).unwrap_or_default()
    }

    fn fail_health_of(&self, version: &str) {
        fs::write(self.dir.path().join("fail-health"), format!("{version}\n")).unwrap();
    }

    fn linked(&self) -> Option<String> {
        app::current_release(&self.layout()).unwrap()
    }

    /// Installs release `version` of the app as if an earlier update had committed it.
    fn install_app(&self, version: &str) {
        let dir = self.layout().release_dir(version);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("version.txt"), version).unwrap();
        app::point_current(&self.layout(), Some(version)).unwrap();
        self.set(|s| {
            s.current = Some(Installed {
                version: version.into(),
                module: Module::App,
            });
        });
    }

    async fn drive(&self) -> RunEnd {
        drive(&self.ctx).await.unwrap()
    }
}

fn app_archive(version: &str) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.tar.gz");
    write_tar_gz(
        &path,
        &[
            Entry::File("version.txt", version.as_bytes(), 0o644),
            Entry::File("bin/run.sh", b"#!/bin/sh\n", 0o755),
        ],
    );
    fs::read(path).unwrap()
}

fn script_archive(body: &str) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.tar.gz");
    write_tar_gz(
        &path,
        &[Entry::File("bundle/update.sh", body.as_bytes(), 0o755)],
    );
    fs::read(path).unwrap()
}

#[tokio::test]
async fn an_app_update_stops_swaps_starts_checks_and_commits() {
    let rig = Rig::new();
    rig.install_app("1");
    fs::create_dir_all(rig.layout().release_dir("0")).unwrap();
    rig.stage("2", Module::App, &app_archive("2"), Step::Unpacking);

    assert_eq!(rig.drive().await, RunEnd::Finished);

    let state = rig.state();
    assert_eq!(state.current_version(), Some("2"));
    assert_eq!(state.previous_app.as_deref(), Some("1"));
    assert!(state.attempt.is_none());
    assert_eq!(rig.linked().as_deref(), Some("2"));
    assert_eq!(rig.commands(), "stop 1\nstart 2 2\n");
    assert_eq!(rig.report_states(), vec![ReportState::Success]);
    let mut left: Vec<_> = fs::read_dir(rig.layout().releases_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    left.sort();
    assert_eq!(
        left,
        vec!["1", "2"],
        "releases older than the previous one are removed"
    );
    assert_eq!(
        fs::read_dir(rig.ctx.paths.downloads_dir()).unwrap().count(),
        0,
        "downloads are removed after a success"
    );
}

#[tokio::test]
async fn a_failing_health_check_rolls_back_to_the_previous_release() {
    let rig = Rig::new();
    rig.install_app("1");
    rig.fail_health_of("2");
    rig.stage("2", Module::App, &app_archive("2"), Step::Unpacking);

    assert_eq!(rig.drive().await, RunEnd::Finished);

    let state = rig.state();
    assert_eq!(state.current_version(), Some("1"));
    assert_eq!(rig.linked().as_deref(), Some("1"));
    assert_eq!(rig.commands(), "stop 1\nstart 2 2\nstop 2\nstart 1 1\n");
    let reports = rig.reports();
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0].state, ReportState::RolledBack);
    assert_eq!(reports[0].output.as_deref(), Some("unhealthy 2\n"));
    let message = reports[0].message.as_deref().unwrap();
    assert!(message.contains("health check did not pass"), "{message}");
    assert!(message.contains("release 1 was restored"), "{message}");
    let record = state.failures.unwrap();
    assert_eq!(
        (record.release.as_str(), record.failures, record.held),
        ("2", 1, false)
    );
}

#[tokio::test]
async fn a_first_install_that_fails_its_health_check_leaves_no_current_release() {
    let rig = Rig::new();
    rig.fail_health_of("1");
    rig.stage("1", Module::App, &app_archive("1"), Step::Unpacking);

    assert_eq!(rig.drive().await, RunEnd::Finished);

    assert_eq!(rig.state().current, None);
    assert_eq!(rig.linked(), None);
    assert!(!rig.layout().current_link().exists());
    assert_eq!(rig.report_states(), vec![ReportState::RolledBack]);
    let message = rig.reports()[0].message.clone().unwrap();
    assert!(message.contains("no previous release"), "{message}");
}

/// Prepares a crash after the swap to `2` (from `1`) at `step`.
fn crashed_after_swap(rig: &Rig, step: Step) {
    rig.install_app("1");
    let mut attempt = rig.stage("2", Module::App, &app_archive("2"), step);
    app::unpack_release(
        &rig.layout(),
        drover_protocol::artifact::ArtifactFormat::TarGz,
        &download::verified_path(&rig.ctx.paths.downloads_dir(), &attempt.offer.sha256),
        "2",
    )
    .unwrap();
    app::point_current(&rig.layout(), Some("2")).unwrap();
    attempt.old_app = Some("1".into());
    rig.set(|s| s.attempt = Some(attempt));
}

#[tokio::test]
async fn swapped_but_not_committed_reruns_start_and_the_health_window() {
    for step in [Step::Swapping, Step::Starting, Step::HealthChecking] {
        let rig = Rig::new();
        crashed_after_swap(&rig, step.clone());
        assert_eq!(
            rig.state().current_version(),
            Some("1"),
            "not committed yet"
        );

        assert_eq!(rig.drive().await, RunEnd::Finished);

        let state = rig.state();
        assert_eq!(state.current_version(), Some("2"), "{step:?}");
        assert_eq!(state.previous_app.as_deref(), Some("1"));
        assert_eq!(rig.linked().as_deref(), Some("2"));
        assert_eq!(rig.commands(), "start 2 2\n", "{step:?}");
        assert_eq!(rig.report_states(), vec![ReportState::Success]);
    }
}

#[tokio::test]
async fn swapped_and_unhealthy_after_a_restart_rolls_back() {
    let rig = Rig::new();
    crashed_after_swap(&rig, Step::HealthChecking);
    rig.fail_health_of("2");

    assert_eq!(rig.drive().await, RunEnd::Finished);

    assert_eq!(rig.state().current_version(), Some("1"));
    assert_eq!(rig.linked().as_deref(), Some("1"));
    assert_eq!(rig.report_states(), vec![ReportState::RolledBack]);
}

#[tokio::test]
async fn an_interrupted_rollback_is_finished() {
    let rig = Rig::new();
    crashed_after_swap(
        &rig,
        Step::RollingBack {
            message: "the health check did not pass".into(),
            output: "unhealthy".into(),
        },
    );

    assert_eq!(rig.drive().await, RunEnd::Finished);

    assert_eq!(rig.state().current_version(), Some("1"));
    assert_eq!(rig.linked().as_deref(), Some("1"));
    assert_eq!(rig.commands(), "stop 2\nstart 1 1\n");
    let reports = rig.reports();
    assert_eq!(reports[0].state, ReportState::RolledBack);
    assert_eq!(reports[0].output.as_deref(), Some("unhealthy"));
}

#[tokio::test]
async fn an_interrupted_unpack_is_redone_from_the_verified_file() {
    let rig = Rig::new();
    let layout = rig.layout();
    fs::create_dir_all(layout.partial_dir("2").join("half")).unwrap();
    rig.stage("2", Module::App, &app_archive("2"), Step::Unpacking);

    assert_eq!(rig.drive().await, RunEnd::Finished);

    assert!(!layout.partial_dir("2").exists());
    assert_eq!(
        fs::read_to_string(layout.release_dir("2").join("version.txt")).unwrap(),
        "2"
    );
    assert_eq!(rig.state().current_version(), Some("2"));
}

#[tokio::test]
async fn a_damaged_verified_file_is_downloaded_again() {
    let rig = Rig::new();
    let attempt = rig.stage("2", Module::App, &app_archive("2"), Step::Unpacking);
    let verified = download::verified_path(&rig.ctx.paths.downloads_dir(), &attempt.offer.sha256);
    fs::write(&verified, b"bit rot").unwrap();

    // The hub (127.0.0.1:9) is not there, so the download waits for later.
    assert!(matches!(rig.drive().await, RunEnd::Deferred(_)));

    assert!(!verified.exists());
    assert_eq!(rig.state().attempt.unwrap().step, Step::Downloading);
    assert!(rig.reports().is_empty(), "not a failure: nothing ran");
}

#[tokio::test]
async fn a_restart_while_update_sh_ran_counts_as_a_failure() {
    let rig = Rig::new();
    rig.stage(
        "2",
        Module::Script,
        &script_archive("#!/bin/sh\n"),
        Step::ScriptRunning,
    );

    assert_eq!(rig.drive().await, RunEnd::Finished);

    let reports = rig.reports();
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0].state, ReportState::Failure);
    assert!(
        reports[0]
            .message
            .as_deref()
            .unwrap()
            .contains("restarted while update.sh was running"),
        "{:?}",
        reports[0].message
    );
    let state = rig.state();
    assert_eq!(state.current, None);
    assert_eq!(state.failures.unwrap().failures, 1);
}

#[tokio::test]
async fn a_committed_update_whose_report_was_not_written_reports_success() {
    let rig = Rig::new();
    rig.stage(
        "2",
        Module::Script,
        &script_archive("#!/bin/sh\n"),
        Step::Finished {
            outcome: Outcome::Success {
                output: "done".into(),
            },
        },
    );
    rig.set(|s| {
        s.current = Some(Installed {
            version: "2".into(),
            module: Module::Script,
        });
    });

    assert_eq!(rig.drive().await, RunEnd::Finished);

    assert_eq!(rig.report_states(), vec![ReportState::Success]);
    assert_eq!(rig.reports()[0].output.as_deref(), Some("done"));
    assert!(rig.state().attempt.is_none());
    assert_eq!(rig.state().current_version(), Some("2"));
}

#[tokio::test]
async fn a_script_update_runs_update_sh_with_the_seed_environment() {
    let rig = Rig::new();
    let out = rig.dir.path().join("env.txt");
    let body = format!(
        "#!/bin/sh\necho \"$DROVER_RELEASE|$config|$apps_root|$(pwd)\" > {}\necho installed\n",
        out.display()
    );
    rig.stage("7", Module::Script, &script_archive(&body), Step::Unpacking);

    assert_eq!(rig.drive().await, RunEnd::Finished);

    let work = rig.ctx.paths.work_dir().join("7/bundle");
    let seen = fs::read_to_string(&out).unwrap();
    let apps_root = rig.ctx.config.apps_root();
    assert_eq!(
        seen,
        format!(
            "7|{{\"greeting\":\"hello\"}}|{}|{}\n",
            apps_root.display(),
            work.canonicalize().unwrap_or(work.clone()).display()
        )
    );
    assert!(apps_root.is_dir());
    assert!(!work.exists(), "the unpack directory is removed afterwards");
    assert_eq!(rig.state().current_version(), Some("7"));
    let reports = rig.reports();
    assert_eq!(reports[0].state, ReportState::Success);
    assert_eq!(reports[0].output.as_deref(), Some("installed\n"));
}

#[tokio::test]
async fn a_failing_script_backs_off_then_is_held_and_reported_once() {
    let rig = Rig::new();
    let artifact = script_archive("#!/bin/sh\necho cannot install >&2\nexit 3\n");
    let mut attempt = rig.stage("2", Module::Script, &artifact, Step::Unpacking);

    assert_eq!(rig.drive().await, RunEnd::Finished);
    let state = rig.state();
    let record = state.failures.clone().unwrap();
    assert_eq!((record.failures, record.held), (1, false));
    assert!(
        record.last_error.contains("exited with code 3"),
        "{}",
        record.last_error
    );
    assert!(
        download::verified_path(&rig.ctx.paths.downloads_dir(), &attempt.offer.sha256).exists(),
        "the download is kept for the retry"
    );
    let desired = drover_protocol::device::DesiredState {
        etag: "e".into(),
        poll_interval_s: 10,
        release: Some(attempt.offer.clone()),
        config: serde_json::Value::Null,
        retry_generation: 0,
    };
    assert_eq!(
        plan(&state, Some(&desired), crate::outbox::now_ms()),
        Plan::WaitUntil(record.retry_at_ms),
        "no retry in a loop"
    );

    attempt.number = 2;
    attempt.step = Step::Unpacking;
    rig.set(|s| s.attempt = Some(attempt));
    assert_eq!(rig.drive().await, RunEnd::Finished);

    let state = rig.state();
    let record = state.failures.clone().unwrap();
    assert_eq!((record.failures, record.held), (2, true));
    assert_eq!(
        rig.report_states(),
        vec![
            ReportState::Failure,
            ReportState::Failure,
            ReportState::Held
        ]
    );
    assert_eq!(rig.reports()[1].output.as_deref(), Some("cannot install\n"));
    assert_eq!(plan(&state, Some(&desired), i64::MAX), Plan::Held);
    assert_eq!(
        state.status(0).phase,
        drover_protocol::device::UpdatePhase::Held
    );
}

#[tokio::test]
async fn node_scripts_and_bare_scripts_for_the_app_module_are_refused() {
    let rig = Rig::new();
    rig.stage(
        "2",
        Module::Script,
        b"#!/usr/bin/env node\nconsole.log(1)\n",
        Step::Unpacking,
    );
    assert_eq!(rig.drive().await, RunEnd::Finished);
    let message = rig.reports()[0].message.clone().unwrap();
    assert!(message.contains("node script"), "{message}");

    let rig = Rig::new();
    rig.stage("2", Module::App, b"#!/bin/sh\necho hi\n", Step::Unpacking);
    assert_eq!(rig.drive().await, RunEnd::Finished);
    let message = rig.reports()[0].message.clone().unwrap();
    assert!(message.contains("needs a tar.gz or zip"), "{message}");
    assert_eq!(rig.linked(), None);
}

#[tokio::test]
async fn an_update_sh_missing_from_the_archive_is_a_reported_failure() {
    let rig = Rig::new();
    rig.stage("2", Module::Script, &app_archive("2"), Step::Unpacking);
    assert_eq!(rig.drive().await, RunEnd::Finished);
    let reports = rig.reports();
    assert_eq!(reports[0].state, ReportState::Failure);
    let message = reports[0].message.clone().unwrap();
    assert!(message.contains("no update.sh"), "{message}");
}

#[tokio::test]
async fn shutdown_during_update_sh_leaves_the_step_for_the_next_start() {
    let rig = Rig::new();
    let started = rig.dir.path().join("started");
    let body = format!("#!/bin/sh\ntouch {}\nsleep 3600\n", started.display());
    rig.stage("2", Module::Script, &script_archive(&body), Step::Unpacking);
    let ctx = rig.ctx.clone();
    let task = tokio::spawn(async move { drive(&ctx).await });
    crate::testutil::wait_until("update.sh to start", || started.exists()).await;
    rig.ctx.cancel.cancel();
    assert_eq!(task.await.unwrap().unwrap(), RunEnd::Cancelled);
    assert_eq!(rig.state().attempt.unwrap().step, Step::ScriptRunning);
    assert!(rig.reports().iter().all(|r| !r.state.is_final()));
}

/// Paths the rig uses must not leak outside its temp dir.
#[test]
fn the_rig_keeps_everything_in_its_temp_dir() {
    let rig = Rig::new();
    let root: PathBuf = rig.dir.path().to_path_buf();
    assert!(rig.ctx.config.app_root().starts_with(&root));
    assert!(rig.ctx.config.apps_root().starts_with(&root));
}
