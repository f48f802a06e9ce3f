//! The real `drover-agent` binary, crashed at every step of an update and started again.
//!
//! Each case installs release 1, deploys release 2, runs the agent with
//! `DROVER_AGENT_CRASH_AT=<step>` (it aborts there, as `kill -9` or a power cut would), starts it
//! again without the hook, and checks that the device ends consistent: the `current` symlink,
//! `state.json`, `drover-agent status`, and the hub's view (the device's `current_release`, the
//! final states of its attempts) all name the same release, and no half-unpacked release is
//! left. Crashes inside `update.sh` and inside the health window are made by the script itself
//! (`kill -9 $PPID`), which works because the agent is their direct parent.

use std::fs;
use std::os::unix::process::ExitStatusExt as _;
use std::time::Duration;

use drover_protocol::device::Module;
use drover_test_support::{CuttingProxy, tar_gz, wait_until};

use crate::common::{Device, Fleet, PATIENCE, final_states, noise};

const SIGABRT: i32 = 6;
const SIGKILL: i32 = 9;

/// A device behind a recording proxy (to see resumed downloads), with app commands that log.
struct Rig {
    fleet: Fleet,
    proxy: CuttingProxy,
    device: Device,
    id: Option<String>,
}

impl Rig {
    async fn new(module: Module) -> Rig {
        let fleet = Fleet::sqlite().await;
        let proxy = CuttingProxy::forward(fleet.hub.hub.addr).await.unwrap();
        let mut device = Device::via(&fleet, &proxy);
        if module == Module::App {
            let log = device.path("commands.log");
            device.config.app.stop =
                Some(format!("echo stop $DROVER_RELEASE >> {}", log.display()));
            device.config.app.start =
                Some(format!("echo start $DROVER_RELEASE >> {}", log.display()));
            // Releases whose archive holds `unhealthy` never pass.
            device.config.app.health = Some("test ! -f unhealthy".into());
            device.config.app.health_window = Duration::from_millis(500);
        }
        Rig {
            fleet,
            proxy,
            device,
            id: None,
        }
    }

    fn id(&self) -> &str {
        self.id.as_deref().unwrap()
    }

    /// Runs the binary until `done` holds for the hub's view, then kills it.
    async fn run_until(&mut self, what: &str, done: impl AsyncFn(&Rig) -> bool) {
        let mut child = self.device.spawn(None);
        let waited = tokio::time::timeout(PATIENCE, async {
            if self.id.is_none() {
                self.id = Some(self.device.wait_enrolled().await);
            }
            let rig = &*self;
            wait_until(PATIENCE, what, || async { done(rig).await.then_some(()) }).await;
        })
        .await;
        child.kill().await.unwrap();
        assert!(
            waited.is_ok(),
            "timed out waiting for {what}; agent log:\n{}",
            self.device.log()
        );
    }

    /// Runs the binary, crashing at `step`, and checks it died of it.
    async fn crash_at(&mut self, step: &str) {
        let died = self.device.run_until_it_dies(Some(step)).await;
        assert_eq!(
            died.signal(),
            Some(SIGABRT),
            "{step}: {died:?}\n{}",
            self.device.log()
        );
        if self.id.is_none() {
            self.id = self.device.status().device_id;
        }
    }

    async fn current_on_hub(&self) -> Option<String> {
        self.fleet.device(self.id()).await["current_release"]
            .as_str()
            .map(str::to_string)
    }

    async fn finals(&self, version: &str) -> Vec<String> {
        final_states(&self.fleet.attempts_at(self.id(), version).await)
    }

    /// Device and hub agree that `version` is installed, and nothing is left half-done.
    async fn assert_runs(&self, version: &str) {
        let status = self.device.status();
        assert_eq!(
            status.current_release.as_deref(),
            Some(version),
            "state.json"
        );
        assert_eq!(status.step, None, "no attempt in progress");
        assert_eq!(status.pending_reports, 0, "every report delivered");
        let printed = self.device.status_command();
        assert!(
            printed.contains(&format!("current release:  {version}\n")),
            "drover-agent status:\n{printed}"
        );
        assert!(printed.contains(self.id()), "{printed}");
        assert_eq!(
            self.current_on_hub().await.as_deref(),
            Some(version),
            "the hub's current_release"
        );
        if self.device.config.app.start.is_some() {
            assert_eq!(
                self.device.linked().as_deref(),
                Some(version),
                "the current symlink"
            );
            let releases = fs::read_dir(self.device.app_root().join("releases")).unwrap();
            for entry in releases {
                let name = entry.unwrap().file_name().to_string_lossy().into_owned();
                assert!(
                    !name.ends_with(".partial"),
                    "a half-unpacked release is left: {name}"
                );
            }
        }
    }

    fn artifact_ranges(&self) -> Vec<Option<String>> {
        self.proxy
            .requests()
            .into_iter()
            .filter(|r| r.path.starts_with("/device/v1/artifacts/"))
            .map(|r| r.range)
            .collect()
    }
}

fn app_release(version: &str, healthy: bool) -> Vec<u8> {
    let data = noise(400_000);
    let mut entries: Vec<(&str, &[u8], u32)> = vec![
        ("VERSION", version.as_bytes(), 0o644),
        ("data.bin", &data, 0o644),
    ];
    if !healthy {
        entries.push(("unhealthy", b"", 0o644));
    }
    tar_gz(&entries)
}

fn script_release(body: &str) -> Vec<u8> {
    let data = noise(400_000);
    tar_gz(&[
        ("update.sh", body.as_bytes(), 0o755),
        ("payload.bin", &data, 0o644),
    ])
}

/// Installs app release 1, then crashes the update to release 2 at `step`.
async fn app_crash(step: &str, healthy: bool) -> Rig {
    let mut rig = Rig::new(Module::App).await;
    if !healthy {
        // One try: the rolled-back release is not retried while the test looks.
        rig.device.config.retry.base = Duration::from_secs(3600);
        rig.device.config.retry.max_backoff = Duration::from_secs(3600);
    }
    rig.fleet
        .deploy("1", Module::App, &app_release("1", true))
        .await;
    rig.run_until("release 1", async |rig: &Rig| {
        rig.current_on_hub().await.as_deref() == Some("1")
    })
    .await;
    rig.fleet
        .deploy("2", Module::App, &app_release("2", healthy))
        .await;
    rig.crash_at(step).await;
    rig
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
        let mut rig = app_crash(step, true).await;
        rig.run_until("release 2 and its success report", async |rig: &Rig| {
            rig.current_on_hub().await.as_deref() == Some("2")
                && rig.finals("2").await.contains(&"success".to_string())
                && rig.device.status().pending_reports == 0
        })
        .await;
        rig.assert_runs("2").await;
        assert_eq!(rig.finals("2").await, vec!["success"], "{step}");
        if step == "download" {
            let ranges = rig.artifact_ranges();
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
        let mut rig = app_crash(step, false).await;
        rig.run_until("the rollback report", async |rig: &Rig| {
            rig.finals("2").await.contains(&"rolled_back".to_string())
                && rig.device.status().pending_reports == 0
        })
        .await;
        rig.assert_runs("1").await;
        assert_eq!(
            rig.finals("2").await.first().map(String::as_str),
            Some("rolled_back")
        );
        let log = fs::read_to_string(rig.device.path("commands.log")).unwrap();
        assert!(log.ends_with("stop 2\nstart 1\n"), "{step}: {log}");
    }
}

#[tokio::test]
async fn killed_during_the_health_window_the_agent_checks_again_and_commits() {
    let mut rig = Rig::new(Module::App).await;
    let marker = rig.device.path("killed-once");
    rig.device.config.app.health = Some(format!(
        "if [ ! -f {m} ]; then touch {m}; kill -9 $PPID; sleep 5; fi; exit 0",
        m = marker.display()
    ));
    rig.fleet
        .deploy("1", Module::App, &app_release("1", true))
        .await;
    let died = rig.device.run_until_it_dies(None).await;
    assert_eq!(died.signal(), Some(SIGKILL), "{}", rig.device.log());
    rig.id = rig.device.status().device_id;
    rig.run_until("release 1", async |rig: &Rig| {
        rig.current_on_hub().await.as_deref() == Some("1")
            && rig.device.status().pending_reports == 0
    })
    .await;
    rig.assert_runs("1").await;
    assert_eq!(rig.finals("1").await, vec!["success"]);
}

#[tokio::test]
async fn a_script_update_crashed_at_any_step_ends_installed() {
    for step in ["download", "verified", "unpacked", "committed"] {
        let mut rig = Rig::new(Module::Script).await;
        let ran = rig.device.path("ran");
        rig.fleet
            .deploy(
                "5",
                Module::Script,
                &script_release(&format!("#!/bin/sh\necho run >> {}\n", ran.display())),
            )
            .await;
        rig.crash_at(step).await;
        rig.run_until("release 5", async |rig: &Rig| {
            rig.current_on_hub().await.as_deref() == Some("5")
                && !rig.finals("5").await.is_empty()
                && rig.device.status().pending_reports == 0
        })
        .await;
        rig.assert_runs("5").await;
        assert_eq!(rig.finals("5").await, vec!["success"], "{step}");
        assert_eq!(
            fs::read_to_string(&ran).unwrap(),
            "run\n",
            "{step}: update.sh ran once"
        );
    }
}

#[tokio::test]
async fn killed_while_update_sh_ran_the_attempt_fails_and_the_retry_installs() {
    let mut rig = Rig::new(Module::Script).await;
    let marker = rig.device.path("killed-once");
    let body = format!(
        "#!/bin/sh\nif [ ! -f {m} ]; then touch {m}; echo killing my agent; kill -9 $PPID; sleep 5; fi\necho second try\n",
        m = marker.display()
    );
    rig.fleet
        .deploy("6", Module::Script, &script_release(&body))
        .await;
    let died = rig.device.run_until_it_dies(None).await;
    assert_eq!(died.signal(), Some(SIGKILL), "{}", rig.device.log());
    rig.id = rig.device.status().device_id;
    rig.run_until("release 6", async |rig: &Rig| {
        rig.finals("6").await.contains(&"success".to_string())
            && rig.current_on_hub().await.as_deref() == Some("6")
            && rig.device.status().pending_reports == 0
    })
    .await;
    rig.assert_runs("6").await;
    let attempts = rig.fleet.attempts_at(rig.id(), "6").await;
    assert_eq!(final_states(&attempts), vec!["failure", "success"]);
    let why = attempts[0].message_of("failure");
    assert!(
        why.contains("restarted while update.sh was running"),
        "{why}"
    );
    let numbers: Vec<u32> = attempts.iter().map(|a| a.attempt).collect();
    assert_eq!(numbers, vec![1, 2]);
}

#[tokio::test]
async fn status_prints_what_the_state_dir_says_and_bad_configs_are_refused() {
    let mut rig = Rig::new(Module::Script).await;
    rig.fleet
        .deploy("7", Module::Script, &script_release("#!/bin/sh\n"))
        .await;
    rig.run_until("release 7", async |rig: &Rig| {
        rig.current_on_hub().await.as_deref() == Some("7")
    })
    .await;
    let printed = rig.device.status_command();
    assert!(printed.contains(rig.id()), "{printed}");
    assert!(printed.contains("current release:  7"), "{printed}");
    assert!(printed.contains("fleet:            lab"), "{printed}");

    let bad = rig.device.path("bad.toml");
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
