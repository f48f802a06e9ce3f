//! The real `drover-agent` binary, crashed at every step of an update and started again.
//!
//! Each case installs release 1, deploys release 2, runs the agent with
//! `DROVER_AGENT_CRASH_AT=<step>` (it aborts there, as `kill -9` or a power cut would), starts it
//! again without the hook, and checks that the device ends consistent: the `current` symlink,
//! `state.json`, the check-ins and the reports all name the same release, and no half-unpacked
//! release is left. Crashes inside `update.sh` and inside the health window are made by the
//! script itself (`kill -9 $PPID`), which works because the agent is their direct parent.

#![allow(
    dead_code,
    reason = "the fake hub and helpers are shared with the unit tests"
)]
#![allow(clippy::unwrap_used, reason = "a panic is how a test fails")]

#[path = "../src/testhub.rs"]
mod testhub;
#[path = "../src/testutil.rs"]
mod testutil;

use std::fs;
use std::os::unix::process::ExitStatusExt as _;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use drover_agent::config::{AgentConfig, AppConfig, PollConfig, RetryConfig};
use drover_agent::{Secret, status};
use drover_protocol::device::Module;
use testhub::FakeHub;
use testutil::{Entry, wait_until, write_tar_gz};

const SIGABRT: i32 = 6;
const SIGKILL: i32 = 9;

struct Device {
    dir: tempfile::TempDir,
    config_path: PathBuf,
    config: AgentConfig,
}

impl Device {
    fn new(hub: &FakeHub, module: Module) -> Device {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("commands.log");
        let mut config = AgentConfig {
            hub_url: hub.url.clone(),
            provisioning_key: Some(Secret::new("drv_p_test")),
            state_dir: dir.path().join("state"),
            device_type: "test-device".into(),
            poll: PollConfig {
                min_interval: Duration::from_millis(100),
                max_interval: Duration::from_secs(2),
                default_interval: Duration::from_millis(200),
                error_backoff_max: Duration::from_secs(1),
            },
            retry: RetryConfig {
                base: Duration::from_millis(100),
                max_backoff: Duration::from_secs(1),
                max_failures: 3,
            },
            ..AgentConfig::default()
        };
        if module == Module::App {
            config.app = AppConfig {
                stop: Some(format!("echo stop $DROVER_RELEASE >> {}", log.display())),
                start: Some(format!("echo start $DROVER_RELEASE >> {}", log.display())),
                // Releases whose archive holds `unhealthy` never pass.
                health: Some("test ! -f unhealthy".into()),
                health_window: Duration::from_millis(500),
                health_interval: Duration::from_millis(50),
                ..AppConfig::default()
            };
        }
        let config_path = dir.path().join("agent.toml");
        let mut device = Device {
            dir,
            config_path,
            config,
        };
        device.save();
        device
    }

    fn save(&mut self) {
        fs::write(&self.config_path, toml::to_string(&self.config).unwrap()).unwrap();
    }

    fn agent(&self, crash_at: Option<&str>) -> tokio::process::Child {
        let stderr = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("agent.log"))
            .unwrap();
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_drover-agent"));
        cmd.args(["run", "--config"])
            .arg(&self.config_path)
            .env("RUST_LOG", "drover_agent=debug")
            .env_remove("DROVER_AGENT_CRASH_AT")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .kill_on_drop(true);
        if let Some(step) = crash_at {
            cmd.env("DROVER_AGENT_CRASH_AT", step);
        }
        cmd.spawn().unwrap()
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    /// Runs the agent until it dies by itself.
    async fn run_until_it_dies(&self, crash_at: Option<&str>) -> ExitStatus {
        let mut child = self.agent(crash_at);
        match tokio::time::timeout(Duration::from_secs(60), child.wait()).await {
            Ok(status) => status.unwrap(),
            Err(_) => panic!("the agent did not die; its log:\n{}", self.log()),
        }
    }

    /// Runs the agent until `done` holds, then kills it.
    async fn run_until(&self, what: &str, done: impl FnMut() -> bool) {
        let mut child = self.agent(None);
        let log = self.dir.path().join("agent.log");
        let waited = tokio::time::timeout(Duration::from_secs(60), wait_until(what, done)).await;
        child.kill().await.unwrap();
        assert!(
            waited.is_ok(),
            "timed out waiting for {what}; agent log:\n{}",
            fs::read_to_string(log).unwrap_or_default()
        );
    }

    fn app_root(&self) -> PathBuf {
        self.config.app_root()
    }

    fn linked(&self) -> Option<String> {
        fs::read_link(self.app_root().join("current"))
            .ok()
            .map(|t| t.file_name().unwrap().to_string_lossy().into_owned())
    }

    fn current(&self) -> Option<String> {
        status(&self.config.state_dir).unwrap().current_release
    }

    /// The device is consistent and runs `version`.
    fn assert_runs(&self, hub: &FakeHub, version: &str) {
        assert_eq!(self.current().as_deref(), Some(version), "state.json");
        let reported = hub
            .state()
            .checkins
            .last()
            .and_then(|(_, c)| c.current_release.clone());
        assert_eq!(reported.as_deref(), Some(version), "the last check-in");
        if self.config.app.start.is_some() {
            assert_eq!(
                self.linked().as_deref(),
                Some(version),
                "the current symlink"
            );
            let releases = fs::read_dir(self.app_root().join("releases")).unwrap();
            for entry in releases {
                let name = entry.unwrap().file_name().to_string_lossy().into_owned();
                assert!(
                    !name.ends_with(".partial"),
                    "a half-unpacked release is left: {name}"
                );
            }
        }
    }
}

/// Pseudo-random bytes: incompressible, so the archive is large enough to arrive in chunks.
fn noise(len: usize) -> Vec<u8> {
    let mut x: u32 = 0x9e37_79b9;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x.to_le_bytes()[0]
        })
        .collect()
}

fn app_release(version: &str, healthy: bool) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.tar.gz");
    let data = noise(400_000);
    let mut entries = vec![
        Entry::File("VERSION", version.as_bytes(), 0o644),
        Entry::File("data.bin", &data, 0o644),
    ];
    if !healthy {
        entries.push(Entry::File("unhealthy", b"", 0o644));
    }
    write_tar_gz(&path, &entries);
    fs::read(path).unwrap()
}

fn script_release(body: &str) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.tar.gz");
    let data = noise(400_000);
    write_tar_gz(
        &path,
        &[
            Entry::File("update.sh", body.as_bytes(), 0o755),
            Entry::File("payload.bin", &data, 0o644),
        ],
    );
    fs::read(path).unwrap()
}

fn reported_current(hub: &FakeHub, version: &str) -> bool {
    hub.state()
        .checkins
        .last()
        .is_some_and(|(_, c)| c.current_release.as_deref() == Some(version))
}

fn final_reports(hub: &FakeHub, version: &str) -> Vec<&'static str> {
    hub.report_states(version)
        .into_iter()
        .filter(|s| !matches!(*s, "downloading" | "installing"))
        .collect()
}

/// Installs app release 1, then crashes the update to release 2 at `step`.
async fn app_crash(step: &str, healthy: bool) -> (FakeHub, Device) {
    let hub = FakeHub::start().await;
    let device = Device::new(&hub, Module::App);
    hub.deploy("1", Module::App, &app_release("1", true));
    device
        .run_until("release 1", || reported_current(&hub, "1"))
        .await;
    hub.deploy("2", Module::App, &app_release("2", healthy));
    let died = device.run_until_it_dies(Some(step)).await;
    assert_eq!(
        died.signal(),
        Some(SIGABRT),
        "{step}: {died:?}\n{}",
        device.log()
    );
    (hub, device)
}

#[tokio::test]
async fn an_app_update_crashed_at_any_step_ends_on_the_new_release() {
    for step in [
        "download",
        "verified",
        "unpacked",
        "stopped",
        "swapped",
        "started",
        "committed",
    ] {
        let (hub, device) = app_crash(step, true).await;
        device
            .run_until("release 2", || {
                reported_current(&hub, "2") && final_reports(&hub, "2").contains(&"success")
            })
            .await;
        device.assert_runs(&hub, "2");
        assert_eq!(final_reports(&hub, "2"), vec!["success"], "{step}");
        if step == "download" {
            let ranges = hub.state().artifact_ranges.clone();
            assert!(
                ranges
                    .iter()
                    .any(|r| r.as_deref().is_some_and(|r| r.starts_with("bytes="))),
                "the download resumed: {ranges:?}"
            );
        }
    }
}

#[tokio::test]
async fn an_unhealthy_app_update_crashed_mid_rollback_ends_on_the_old_release() {
    for step in ["swapped", "rolled-back"] {
        let (hub, device) = app_crash(step, false).await;
        device
            .run_until("the rollback report", || {
                final_reports(&hub, "2").contains(&"rolled_back")
            })
            .await;
        device.assert_runs(&hub, "1");
        let log = fs::read_to_string(device.dir.path().join("commands.log")).unwrap();
        assert!(log.ends_with("stop 2\nstart 1\n"), "{step}: {log}");
    }
}

#[tokio::test]
async fn killed_during_the_health_window_the_agent_checks_again_and_commits() {
    let hub = FakeHub::start().await;
    let mut device = Device::new(&hub, Module::App);
    let marker = device.dir.path().join("killed-once");
    device.config.app.health = Some(format!(
        "if [ ! -f {m} ]; then touch {m}; kill -9 $PPID; sleep 5; fi; exit 0",
        m = marker.display()
    ));
    device.save();
    hub.deploy("1", Module::App, &app_release("1", true));
    let died = device.run_until_it_dies(None).await;
    assert_eq!(died.signal(), Some(SIGKILL), "{}", device.log());
    device
        .run_until("release 1", || reported_current(&hub, "1"))
        .await;
    device.assert_runs(&hub, "1");
    assert_eq!(final_reports(&hub, "1"), vec!["success"]);
}

#[tokio::test]
async fn a_script_update_crashed_at_any_step_ends_installed() {
    for step in ["download", "verified", "unpacked", "committed"] {
        let hub = FakeHub::start().await;
        let device = Device::new(&hub, Module::Script);
        let ran = device.dir.path().join("ran");
        hub.deploy(
            "5",
            Module::Script,
            &script_release(&format!("#!/bin/sh\necho run >> {}\n", ran.display())),
        );
        let died = device.run_until_it_dies(Some(step)).await;
        assert_eq!(
            died.signal(),
            Some(SIGABRT),
            "{step}: {died:?}\n{}",
            device.log()
        );
        device
            .run_until("release 5", || {
                reported_current(&hub, "5") && !final_reports(&hub, "5").is_empty()
            })
            .await;
        device.assert_runs(&hub, "5");
        assert_eq!(final_reports(&hub, "5"), vec!["success"], "{step}");
        assert_eq!(
            fs::read_to_string(&ran).unwrap(),
            "run\n",
            "{step}: update.sh ran once"
        );
    }
}

#[tokio::test]
async fn killed_while_update_sh_ran_the_attempt_fails_and_the_retry_installs() {
    let hub = FakeHub::start().await;
    let device = Device::new(&hub, Module::Script);
    let marker = device.dir.path().join("killed-once");
    let body = format!(
        "#!/bin/sh\nif [ ! -f {m} ]; then touch {m}; echo killing my agent; kill -9 $PPID; sleep 5; fi\necho second try\n",
        m = marker.display()
    );
    hub.deploy("6", Module::Script, &script_release(&body));
    let died = device.run_until_it_dies(None).await;
    assert_eq!(died.signal(), Some(SIGKILL), "{}", device.log());
    device
        .run_until("release 6", || {
            final_reports(&hub, "6").contains(&"success") && reported_current(&hub, "6")
        })
        .await;
    device.assert_runs(&hub, "6");
    assert_eq!(final_reports(&hub, "6"), vec!["failure", "success"]);
    let state = hub.state();
    let failure = state
        .reports
        .iter()
        .find(|r| r.state.as_str() == "failure")
        .unwrap();
    assert!(
        failure
            .message
            .as_deref()
            .unwrap()
            .contains("restarted while update.sh was running"),
        "{failure:?}"
    );
    let attempts: Vec<u32> = state
        .reports
        .iter()
        .filter(|r| r.state.is_final())
        .map(|r| r.attempt)
        .collect();
    assert_eq!(attempts, vec![1, 2]);
}

#[tokio::test]
async fn status_prints_what_the_state_dir_says() {
    let hub = FakeHub::start().await;
    let device = Device::new(&hub, Module::Script);
    hub.deploy("7", Module::Script, &script_release("#!/bin/sh\n"));
    device
        .run_until("release 7", || reported_current(&hub, "7"))
        .await;
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_drover-agent"))
        .args(["status", "--config"])
        .arg(&device.config_path)
        .output()
        .unwrap();
    assert!(output.status.success());
    let text = String::from_utf8(output.stdout).unwrap();
    assert!(text.contains("testdevice"), "{text}");
    assert!(text.contains("current release:  7"), "{text}");

    let bad = device.dir.path().join("bad.toml");
    fs::write(&bad, "hub_url = \"http://x\"\nbogus = 1\n").unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_drover-agent"))
        .args(["run", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let err = String::from_utf8(output.stderr).unwrap();
    assert!(err.contains("bogus") && err.contains("bad.toml"), "{err}");
}
