//! What every end-to-end test needs: a real hub with a fleet and its release key, devices that
//! run the real agent (in-process through `drover_agent::run`, or as the `drover-agent` binary
//! when a test kills it), and the hub's own view of each device through the management API.

use std::cell::Cell;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use drover_agent::config::{AgentConfig, AppConfig, PollConfig, RetryConfig};
use drover_agent::{AgentStatus, Secret};
use drover_protocol::device::Module;
use drover_protocol::signing::ReleaseSigningKey;
use drover_test_support::{Api, CuttingProxy, Engine, TestHub, wait_until};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How long any one wait may take before the test fails. Generous: the suite shares two cores.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// The device type every test device reports.
pub const DEVICE_TYPE: &str = "test-device";

/// Logs of the hub and the in-process agents go to the test's captured output, shown when it
/// fails (`RUST_LOG` overrides the filter).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("drover_agent=debug,warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .with_ansi(false)
        .try_init();
}

/// A hub with one fleet (`lab`) and the fleet's release signing key.
pub struct Fleet {
    pub hub: TestHub,
    pub api: Api,
    pub name: String,
    pub provisioning_key: String,
    pub key: ReleaseSigningKey,
}

impl Fleet {
    /// A hub on `engine` with a fleet that accepts devices at once, or `None` when the engine is
    /// PostgreSQL and no server is configured.
    pub async fn start(engine: Engine) -> Option<Fleet> {
        let hub = TestHub::start(engine).await.unwrap()?;
        Some(Fleet::on(hub, true).await)
    }

    /// A SQLite hub with a fleet that accepts devices at once.
    pub async fn sqlite() -> Fleet {
        Fleet::start(Engine::Sqlite).await.unwrap()
    }

    /// A fleet on `hub`; `auto_accept: false` makes an operator accept each device.
    pub async fn on(hub: TestHub, auto_accept: bool) -> Fleet {
        init_logging();
        let api = hub.api();
        let (provisioning_key, key) = api.create_fleet("lab", auto_accept, 1).await.unwrap();
        Fleet {
            hub,
            api,
            name: "lab".into(),
            provisioning_key,
            key,
        }
    }

    /// A fleet on `hub` that accepts devices at once but has no release key yet (`key` is made,
    /// but not given to the fleet).
    pub async fn without_release_key(hub: TestHub) -> Fleet {
        init_logging();
        let api = hub.api();
        let (status, body) = api
            .post(
                "/api/v1/fleets",
                json!({"name": "lab", "auto_accept": true, "poll_interval_s": 1}),
            )
            .await
            .unwrap();
        assert_eq!(status, 201, "{body}");
        Fleet {
            hub,
            api,
            name: "lab".into(),
            provisioning_key: body["provisioning_key"].as_str().unwrap().to_string(),
            key: ReleaseSigningKey::generate(),
        }
    }

    /// Uploads an artifact and creates a release of it signed with the fleet's key.
    pub async fn release(&self, version: &str, module: Module, artifact: &[u8]) {
        self.api
            .create_release(&self.name, version, module, artifact, &self.key)
            .await
            .unwrap();
    }

    /// Creates a release and makes it the fleet's target.
    pub async fn deploy(&self, version: &str, module: Module, artifact: &[u8]) {
        self.release(version, module, artifact).await;
        self.api.deploy(&self.name, version).await.unwrap();
    }

    /// Sets the fleet's config.
    pub async fn set_config(&self, config: Value) {
        let (status, body) = self
            .api
            .patch(
                &format!("/api/v1/fleets/{}", self.name),
                json!({ "config": config }),
            )
            .await
            .unwrap();
        assert_eq!(status, 200, "{body}");
    }

    /// `POST /api/v1/devices/{id}/{action}` (accept, revoke, retry).
    pub async fn act(&self, id: &str, action: &str) -> Value {
        let (status, body) = self
            .api
            .post(&format!("/api/v1/devices/{id}/{action}"), json!({}))
            .await
            .unwrap();
        assert_eq!(status, 200, "{action}: {body}");
        body
    }

    /// `GET /api/v1/devices/{id}`.
    pub async fn device(&self, id: &str) -> Value {
        let (status, body) = self
            .api
            .get(&format!("/api/v1/devices/{id}"))
            .await
            .unwrap();
        assert_eq!(status, 200, "{body}");
        body
    }

    /// The devices of the fleet.
    pub async fn devices(&self) -> Vec<Value> {
        let (status, body) = self
            .api
            .get(&format!("/api/v1/devices?fleet={}", self.name))
            .await
            .unwrap();
        assert_eq!(status, 200, "{body}");
        body.as_array().unwrap().clone()
    }

    /// `GET /api/v1/devices/{id}/attempts`, oldest first.
    pub async fn attempts(&self, id: &str) -> Vec<Attempt> {
        let (status, body) = self
            .api
            .get(&format!("/api/v1/devices/{id}/attempts"))
            .await
            .unwrap();
        assert_eq!(status, 200, "{body}");
        let mut attempts: Vec<Attempt> = serde_json::from_value(body).unwrap();
        attempts.reverse();
        attempts
    }

    /// The attempts at one release, oldest first.
    pub async fn attempts_at(&self, id: &str, release: &str) -> Vec<Attempt> {
        let mut attempts = self.attempts(id).await;
        attempts.retain(|a| a.release == release);
        attempts
    }

    /// Waits until the hub's view of the device passes `check`, and returns it.
    pub async fn wait_device(&self, id: &str, what: &str, check: impl Fn(&Value) -> bool) -> Value {
        wait_until(PATIENCE, what, || async {
            let device = self.device(id).await;
            check(&device).then_some(device)
        })
        .await
    }

    /// Waits until the device has reported `version` as its current release.
    pub async fn wait_current(&self, id: &str, version: &str) {
        self.wait_device(id, &format!("the hub to see release {version}"), |d| {
            d["current_release"] == version
        })
        .await;
    }

    /// Waits until the device's attempts pass `check`, and returns them (oldest first).
    pub async fn wait_attempts(
        &self,
        id: &str,
        what: &str,
        check: impl Fn(&[Attempt]) -> bool,
    ) -> Vec<Attempt> {
        wait_until(PATIENCE, what, || async {
            let attempts = self.attempts(id).await;
            check(&attempts).then_some(attempts)
        })
        .await
    }

    /// Waits until the hub has seen `n` more check-ins from the device (its `last_seen` moved
    /// forward `n` times).
    pub async fn wait_checkins(&self, id: &str, n: usize) {
        let last_seen = |device: &Value| device["last_seen"].as_i64().unwrap_or(0);
        let progress = Cell::new((last_seen(&self.device(id).await), 0));
        wait_until(PATIENCE, &format!("{n} more check-ins"), || async {
            let seen = last_seen(&self.device(id).await);
            let (last, count) = progress.get();
            if seen > last {
                progress.set((seen, count + 1));
            }
            (progress.get().1 >= n).then_some(())
        })
        .await;
    }

    /// Where the hub keeps an artifact.
    pub fn artifact_file(&self, sha256: &str) -> PathBuf {
        self.hub
            .data_dir
            .join("artifacts/sha256")
            .join(&sha256[..2])
            .join(sha256)
    }
}

/// One update attempt as the hub shows it.
#[derive(Debug, Clone, Deserialize)]
pub struct Attempt {
    pub release: String,
    pub attempt: u32,
    pub state: String,
    pub message: Option<String>,
    pub output: Option<String>,
    pub events: Vec<AttemptEvent>,
}

/// One step of an attempt.
#[derive(Debug, Clone, Deserialize)]
pub struct AttemptEvent {
    pub state: String,
    pub message: Option<String>,
    pub at: i64,
    pub received_at: i64,
}

impl Attempt {
    /// The states it went through, in order.
    pub fn states(&self) -> Vec<&str> {
        self.events.iter().map(|e| e.state.as_str()).collect()
    }

    /// The message of its first event in `state`.
    pub fn message_of(&self, state: &str) -> String {
        self.events
            .iter()
            .find(|e| e.state == state)
            .and_then(|e| e.message.clone())
            .unwrap_or_default()
    }
}

/// The final states (success, failure, rolled back, held) of a list of attempts, in order.
pub fn final_states(attempts: &[Attempt]) -> Vec<String> {
    attempts
        .iter()
        .flat_map(|a| a.states())
        .filter(|s| !matches!(*s, "downloading" | "installing"))
        .map(str::to_string)
        .collect()
}

/// A device: a temporary directory with the agent's config and state.
pub struct Device {
    pub dir: tempfile::TempDir,
    pub config: AgentConfig,
}

impl Device {
    /// A device enrolling in `fleet`, talking to the hub directly.
    pub fn new(fleet: &Fleet) -> Device {
        Device::at(fleet, &fleet.hub.url)
    }

    /// A device enrolling in `fleet` through a proxy.
    pub fn via(fleet: &Fleet, proxy: &CuttingProxy) -> Device {
        Device::at(fleet, &proxy.url())
    }

    fn at(fleet: &Fleet, url: &str) -> Device {
        let dir = tempfile::tempdir().unwrap();
        let config = AgentConfig {
            hub_url: url.to_string(),
            ca_file: fleet.hub.hub.ca_file.clone(),
            provisioning_key: Some(Secret::new(fleet.provisioning_key.clone())),
            state_dir: dir.path().join("state"),
            device_type: DEVICE_TYPE.into(),
            tags: vec!["lab".into()],
            // The hub asks for 1 s; the ceiling makes check-ins come every ~200 ms.
            poll: PollConfig {
                min_interval: Duration::from_millis(100),
                max_interval: Duration::from_millis(200),
                default_interval: Duration::from_millis(100),
                error_backoff_max: Duration::from_secs(1),
            },
            retry: RetryConfig {
                base: Duration::from_millis(100),
                max_backoff: Duration::from_millis(400),
                max_failures: 3,
            },
            app: AppConfig {
                health_window: Duration::from_secs(5),
                health_interval: Duration::from_millis(50),
                ..AppConfig::default()
            },
            ..AgentConfig::default()
        };
        Device { dir, config }
    }

    /// A path in the device's directory (outside the state directory), for files that scripts
    /// and tests exchange.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Starts the agent in-process.
    pub fn start(&self) -> Running {
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(drover_agent::run(self.config.clone(), shutdown.clone()));
        Running { shutdown, task }
    }

    /// The config file the binary is started with (written from `config` on every start).
    pub fn config_path(&self) -> PathBuf {
        self.path("agent.toml")
    }

    /// Starts the `drover-agent` binary, crashing at `crash_at` if given. Its log goes to
    /// `agent.log`.
    pub fn spawn(&self, crash_at: Option<&str>) -> tokio::process::Child {
        fs::write(self.config_path(), toml::to_string(&self.config).unwrap()).unwrap();
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path("agent.log"))
            .unwrap();
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_drover-agent"));
        cmd.args(["run", "--config"])
            .arg(self.config_path())
            .env("RUST_LOG", "drover_agent=debug")
            .env_remove("DROVER_AGENT_CRASH_AT")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true);
        if let Some(step) = crash_at {
            cmd.env("DROVER_AGENT_CRASH_AT", step);
        }
        cmd.spawn().unwrap()
    }

    /// The binary's log.
    pub fn log(&self) -> String {
        fs::read_to_string(self.path("agent.log")).unwrap_or_default()
    }

    /// Runs the binary until it dies by itself.
    pub async fn run_until_it_dies(&self, crash_at: Option<&str>) -> ExitStatus {
        let mut child = self.spawn(crash_at);
        match tokio::time::timeout(PATIENCE, child.wait()).await {
            Ok(status) => status.unwrap(),
            Err(_) => panic!("the agent did not die; its log:\n{}", self.log()),
        }
    }

    /// What the state directory says.
    pub fn status(&self) -> AgentStatus {
        drover_agent::status(&self.config.state_dir).unwrap()
    }

    /// `drover-agent status`, run as a command.
    pub fn status_command(&self) -> String {
        fs::write(self.config_path(), toml::to_string(&self.config).unwrap()).unwrap();
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_drover-agent"))
            .args(["status", "--config"])
            .arg(self.config_path())
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        String::from_utf8(output.stdout).unwrap()
    }

    /// Waits until the agent has enrolled and returns its device ID.
    pub async fn wait_enrolled(&self) -> String {
        wait_until(PATIENCE, "the device to enrol", || async {
            self.status().device_id
        })
        .await
    }

    /// The app module's root.
    pub fn app_root(&self) -> PathBuf {
        self.config.app_root()
    }

    /// The release the `current` symlink points at.
    pub fn linked(&self) -> Option<String> {
        fs::read_link(self.app_root().join("current"))
            .ok()
            .map(|t| t.file_name().unwrap().to_string_lossy().into_owned())
    }
}

/// An agent running in-process.
pub struct Running {
    shutdown: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Running {
    /// Stops it and checks that it ended cleanly.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
    }
}

/// Pseudo-random bytes: incompressible, so an archive holding them is large enough to arrive
/// in several chunks (and to be cut part-way).
pub fn noise(len: usize) -> Vec<u8> {
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

/// A tar.gz holding `update.sh` with `body` at its root.
pub fn script_release(body: &str) -> Vec<u8> {
    drover_test_support::tar_gz(&[("update.sh", body.as_bytes(), 0o755)])
}

/// A script that appends `line` to `file` and prints `done`.
pub fn marker_script(file: &Path, line: &str) -> String {
    format!("#!/bin/sh\necho {line} >> {}\necho done\n", file.display())
}

/// Reads a JSON file.
pub fn read_json(path: &Path) -> Value {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}
