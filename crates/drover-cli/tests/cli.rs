//! The `drover` binary as an operator uses it, against a real hub: login, keys, fleets,
//! signed releases, deploys, devices, status, the demo — and the errors a new user will hit.

#![allow(clippy::unwrap_used, reason = "a panic is how a test fails")]

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use drover_test_support::{Engine, TestHub, tar_gz, wait_until};
use serde_json::Value;

/// Runs `drover` with its own CLI config file.
struct Cli {
    config: PathBuf,
    dir: PathBuf,
}

impl Cli {
    fn new(dir: &Path) -> Cli {
        Cli {
            config: dir.join("cli.toml"),
            dir: dir.to_path_buf(),
        }
    }

    async fn run(&self, args: &[&str]) -> Output {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_drover"))
            .args(args)
            .env("DROVER_CLI_CONFIG", &self.config)
            .env_remove("DROVER_HUB_URL")
            .env_remove("DROVER_TOKEN")
            .env_remove("DROVER_CA_FILE")
            .env_remove("DROVER_RELEASE_KEY")
            .current_dir(&self.dir)
            .output()
            .await
            .unwrap()
    }

    /// Runs and expects success; returns stdout.
    async fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args).await;
        assert!(
            out.status.success(),
            "drover {args:?} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs with --json and parses stdout.
    async fn json(&self, args: &[&str]) -> Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        serde_json::from_str(&self.ok(&all).await).unwrap()
    }

    /// Runs and expects failure; returns stderr.
    async fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args).await;
        assert!(!out.status.success(), "drover {args:?} should have failed");
        String::from_utf8(out.stderr).unwrap()
    }
}

#[tokio::test]
async fn an_operator_signs_deploys_and_manages_devices() {
    let hub = TestHub::start(Engine::Sqlite).await.unwrap().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cli = Cli::new(dir.path());
    let token_file = hub.data_dir.join(drover_hub::ADMIN_TOKEN_FILE);

    let out = cli
        .ok(&[
            "login",
            "--hub",
            &hub.url,
            "--token-file",
            token_file.to_str().unwrap(),
        ])
        .await;
    assert!(out.contains("organization default"), "{out}");

    let keys = cli
        .json(&["keys", "generate", "--out", "release.key"])
        .await;
    let public = keys["public_key"].as_str().unwrap().to_string();
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(dir.path().join("release.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let err = cli
        .fails(&["keys", "generate", "--out", "release.key"])
        .await;
    assert!(err.contains("already exists"), "{err}");

    let created = cli
        .json(&[
            "fleet",
            "create",
            "solar",
            "--release-key",
            &public,
            "--poll-interval",
            "1",
        ])
        .await;
    let provisioning_key = created["provisioning_key"].as_str().unwrap().to_string();
    let fleets = cli.json(&["fleet", "list"]).await;
    assert_eq!(fleets[0]["name"], "solar");
    let table = cli.ok(&["fleet", "list"]).await;
    assert!(
        table.starts_with("NAME") && table.contains("solar"),
        "{table}"
    );

    // A real agent, in-process, enrols and waits for acceptance.
    let shutdown = tokio_util::sync::CancellationToken::new();
    let mut agent = drover_agent::AgentConfig {
        hub_url: hub.url.clone(),
        provisioning_key: Some(drover_agent::Secret::new(&provisioning_key)),
        state_dir: dir.path().join("agent"),
        device_type: "rpi4".into(),
        ..drover_agent::AgentConfig::default()
    };
    agent.poll.min_interval = Duration::from_millis(200);
    agent.poll.default_interval = Duration::from_millis(300);
    agent.poll.error_backoff_max = Duration::from_secs(1);
    let agent_task = tokio::spawn(drover_agent::run(agent, shutdown.clone()));

    let id = wait_until(Duration::from_secs(20), "the agent to enrol", || async {
        let devices = cli.json(&["device", "list", "--status", "pending"]).await;
        devices[0]["id"].as_str().map(String::from)
    })
    .await;
    let types = cli.ok(&["device", "types"]).await;
    assert!(types.contains("rpi4"), "{types}");
    let out = cli.ok(&["device", "accept", &id]).await;
    assert!(out.contains("Accepted"), "{out}");

    let artifact = dir.path().join("app-1.0.tar.gz");
    std::fs::write(&artifact, tar_gz(&[("VERSION", b"1.0\n", 0o644)])).unwrap();
    let release = cli
        .json(&[
            "release",
            "create",
            "--fleet",
            "solar",
            "--version",
            "1.0",
            "--module",
            "app",
            "--quiet",
            artifact.to_str().unwrap(),
        ])
        .await;
    assert_eq!(release["seq"], 1);
    let listed = cli.ok(&["release", "list", "--fleet", "solar"]).await;
    assert!(listed.contains("1.0") && listed.contains("#1"), "{listed}");
    cli.ok(&["deploy", "--fleet", "solar", "--release", "1.0"])
        .await;
    wait_until(Duration::from_secs(30), "the device to run 1.0", || async {
        let status = cli.json(&["status", "--fleet", "solar"]).await;
        (status[0]["converged"] == true && status[0]["up_to_date"] == 1).then_some(())
    })
    .await;
    let shown = cli.ok(&["device", "show", &id]).await;
    assert!(shown.contains("Release:     1.0"), "{shown}");
    assert!(shown.contains("success"), "{shown}");
    let device = cli.json(&["device", "show", &id]).await;
    assert_eq!(device["current_release"], "1.0");
    assert_eq!(device["attempts"][0]["state"], "success");

    let config = dir.path().join("device.json");
    std::fs::write(&config, r#"{"meter": {"name": "m-17"}}"#).unwrap();
    cli.ok(&[
        "device",
        "set",
        &id,
        "--config-file",
        config.to_str().unwrap(),
    ])
    .await;
    let device = cli.json(&["device", "show", &id]).await;
    assert_eq!(device["config"]["meter"]["name"], "m-17");
    cli.ok(&[
        "site",
        "create",
        "home",
        "--customer",
        "Kristina",
        "--reporting-start",
        "2026-01-01",
    ])
    .await;
    cli.ok(&["device", "set", &id, "--site", "home"]).await;
    let shown = cli.ok(&["device", "show", &id]).await;
    assert!(
        shown.contains("Site:        home (customer Kristina)"),
        "{shown}"
    );
    let sites = cli.ok(&["site", "list"]).await;
    assert!(sites.contains("2026-01-01 00:00"), "{sites}");
    let err = cli
        .fails(&["site", "create", "x", "--reporting-start", "01/02/2026"])
        .await;
    assert!(err.contains("YYYY-MM-DD"), "{err}");
    cli.ok(&["device", "retry", &id]).await;
    cli.ok(&["device", "revoke", &id]).await;
    let device = cli.json(&["device", "show", &id]).await;
    assert_eq!(device["status"], "revoked");

    cli.ok(&["fleet", "set", "solar", "--seed-protocol", "on"])
        .await;
    let fleet = cli.ok(&["fleet", "show", "solar"]).await;
    assert!(fleet.contains("Seed protocol: on, at http://"), "{fleet}");

    shutdown.cancel();
    agent_task.await.unwrap().unwrap();
    hub.stop().await.unwrap();
}

#[tokio::test]
async fn mistakes_get_clear_errors_and_a_failing_exit() {
    let hub = TestHub::start(Engine::Sqlite).await.unwrap().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cli = Cli::new(dir.path());

    let err = cli.fails(&["fleet", "list"]).await;
    assert!(err.contains("drover login"), "{err}");
    let err = cli
        .fails(&["login", "--hub", &hub.url, "--token", "drv_o_wrong"])
        .await;
    assert!(err.contains("unknown or revoked"), "{err}");
    let err = cli
        .fails(&["login", "--hub", "http://127.0.0.1:1", "--token", "drv_o_x"])
        .await;
    assert!(err.contains("could not reach the hub"), "{err}");

    cli.ok(&["login", "--hub", &hub.url, "--token", &hub.token])
        .await;
    cli.ok(&["keys", "generate", "--out", "mine.key"]).await;
    cli.ok(&["keys", "generate", "--out", "other.key"]).await;
    let public = cli.ok(&["keys", "public", "--key", "mine.key"]).await;
    cli.ok(&["fleet", "create", "solar", "--release-key", public.trim()])
        .await;
    let err = cli.fails(&["fleet", "create", "solar"]).await;
    assert!(err.contains("already exists"), "{err}");
    let err = cli.fails(&["fleet", "create", "bad name"]).await;
    assert!(err.contains("a fleet name"), "{err}");

    let artifact = dir.path().join("app.tar.gz");
    std::fs::write(&artifact, tar_gz(&[("VERSION", b"1\n", 0o644)])).unwrap();
    let path = artifact.to_str().unwrap();
    let err = cli
        .fails(&[
            "release",
            "create",
            "--fleet",
            "solar",
            "--version",
            "1.0",
            "--module",
            "app",
            "--key",
            "other.key",
            path,
        ])
        .await;
    assert!(err.contains("is not the fleet's release key"), "{err}");
    let err = cli
        .fails(&[
            "release",
            "create",
            "--fleet",
            "solar",
            "--version",
            "../1",
            "--module",
            "app",
            "--key",
            "mine.key",
            path,
        ])
        .await;
    assert!(err.contains("a release version"), "{err}");
    let err = cli
        .fails(&[
            "release",
            "create",
            "--fleet",
            "solar",
            "--version",
            "1.0",
            "--module",
            "app",
            "--key",
            "missing.key",
            path,
        ])
        .await;
    assert!(err.contains("drover keys generate"), "{err}");
    let err = cli
        .fails(&[
            "release",
            "create",
            "--fleet",
            "nope",
            "--version",
            "1.0",
            "--module",
            "app",
            "--key",
            "mine.key",
            path,
        ])
        .await;
    assert!(err.contains("fleet \"nope\" does not exist"), "{err}");
    let err = cli
        .fails(&["deploy", "--fleet", "solar", "--release", "9.9"])
        .await;
    assert!(err.contains("release \"9.9\""), "{err}");
    std::fs::write(dir.path().join("bad.json"), "[1, 2]").unwrap();
    let err = cli
        .fails(&["fleet", "set", "solar", "--config-file", "bad.json"])
        .await;
    assert!(err.contains("must hold a JSON object"), "{err}");
    let err = cli.fails(&["device", "show", "nosuchdevice"]).await;
    assert!(err.contains("does not exist"), "{err}");
    hub.stop().await.unwrap();
}

#[tokio::test]
async fn the_demo_converges_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let cli = Cli::new(dir.path());
    let data = dir.path().join("demo");
    let out = cli
        .run(&[
            "demo",
            "--devices",
            "4",
            "--until-converged",
            "--timeout",
            "120",
            "--data-dir",
            data.to_str().unwrap(),
        ])
        .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("Converged: 4 devices run 1.0.0"),
        "{stderr}"
    );
    assert!(stderr.contains("admin token:  drv_o_"), "{stderr}");
    // Every device's simulated meter had readings stored before the demo said it was done.
    assert!(
        stderr.contains("Data: 4 meters report every 2 s"),
        "{stderr}"
    );
    assert!(stderr.contains("drover query "), "{stderr}");
    assert!(data.join("hub/tls/ca.pem").exists());
    // Each agent has its own state directory, with the release unpacked and current.
    for n in 1..=4 {
        let current = data.join(format!("agents/agent-{n:03}/app/current"));
        let version = std::fs::read_to_string(current.join("VERSION")).unwrap();
        assert_eq!(version.trim(), "1.0.0");
    }
    // A second demo refuses to reuse the non-empty directory.
    let err = cli
        .fails(&[
            "demo",
            "--devices",
            "1",
            "--data-dir",
            data.to_str().unwrap(),
        ])
        .await;
    assert!(err.contains("is not empty"), "{err}");
}

#[tokio::test]
async fn series_queries_and_reports_from_the_command_line() {
    use drover_protocol::reading::{Channel, ClockState, MeterId, Reading};
    let hub = TestHub::start(Engine::Sqlite).await.unwrap().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cli = Cli::new(dir.path());
    cli.ok(&["login", "--hub", &hub.url, "--token", &hub.token])
        .await;
    let created = cli
        .json(&["fleet", "create", "solar", "--auto-accept"])
        .await;
    let key = created["provisioning_key"].as_str().unwrap();
    let device = drover_test_support::device::BareDevice::enroll(&hub.url, key)
        .await
        .unwrap();
    cli.ok(&[
        "site",
        "create",
        "house",
        "--customer",
        "Kristina",
        "--reporting-start",
        "2026-10-01",
    ])
    .await;
    cli.ok(&["device", "set", device.id.as_str(), "--site", "house"])
        .await;
    // 2026-10-02 10:00 UTC: a register counting 3 Wh per 2 s for 10 minutes, and power.
    let t0 = 1_790_935_200_000i64;
    let mut readings = Vec::new();
    for i in 0..300 {
        for (channel, value) in [
            (Channel::EnergyImport, 10_000 + 3 * i),
            (Channel::Power, 5_400),
        ] {
            readings.push(Reading {
                meter: MeterId::parse("modbus-42").unwrap(),
                channel,
                ts_ms: t0 + i * 2_000,
                value,
                scale: 0,
                clock: ClockState::Synced,
            });
        }
    }
    assert_eq!(device.send(1, readings).await.unwrap(), 204);

    let series = cli.ok(&["series", "list", "--site", "house"]).await;
    assert!(
        series.contains("energy_import") && series.contains("modbus-42"),
        "{series}"
    );
    let listed = cli.json(&["series", "list", "--channel", "power"]).await;
    assert_eq!(listed[0]["points"], 300);
    let csv = cli
        .ok(&[
            "query",
            "--device",
            device.id.as_str(),
            "--channel",
            "power",
            "--from",
            "2026-10-02",
            "--to",
            "2026-10-03",
            "--resolution",
            "1m",
            "--agg",
            "avg",
            "--format",
            "csv",
        ])
        .await;
    assert!(csv.starts_with("time_ms,time,value\n"), "{csv}");
    assert_eq!(csv.lines().count(), 1 + 10, "ten minutes: {csv}");
    assert!(csv.contains(",5400"), "{csv}");
    let err = cli.fails(&["query", "--device", device.id.as_str()]).await;
    assert!(err.contains("2 series match"), "{err}");

    let report = cli
        .json(&[
            "report",
            "create",
            "--scope",
            "site",
            "--subject",
            "house",
            "--month",
            "2026-10",
        ])
        .await;
    assert_eq!(report["content"]["energy_wh"].as_f64(), Some(897.0));
    let id = report["id"].as_i64().unwrap().to_string();
    let shown = cli.ok(&["report", "show", &id]).await;
    assert!(
        shown.contains("Energy:       897 Wh") && shown.contains("draft"),
        "{shown}"
    );
    let frozen = cli.ok(&["report", "freeze", &id]).await;
    assert!(frozen.contains("verified"), "{frozen}");
    let out = dir.path().join("report.csv");
    cli.ok(&["report", "export", &id, "--out", out.to_str().unwrap()])
        .await;
    let csv = std::fs::read_to_string(&out).unwrap();
    assert!(
        csv.contains("frozen; sha256") && csv.contains(",897,"),
        "{csv}"
    );
    let err = cli.fails(&["report", "freeze", &id]).await;
    assert!(err.contains("frozen already"), "{err}");
    let since = cli
        .json(&[
            "report",
            "create",
            "--scope",
            "customer",
            "--subject",
            "Kristina",
            "--since-start",
        ])
        .await;
    assert_eq!(since["content"]["energy_wh"].as_f64(), Some(897.0));
    let list = cli.ok(&["report", "list"]).await;
    assert!(list.contains("site") && list.contains("customer"), "{list}");
    // Site history: the box leaves the house from November; a change before that is refused.
    let id = device.id.as_str();
    cli.ok(&[
        "device",
        "set",
        id,
        "--site",
        "",
        "--site-since",
        "2026-11-01",
    ])
    .await;
    let err = cli
        .fails(&[
            "device",
            "set",
            id,
            "--site",
            "house",
            "--site-since",
            "2026-10-15",
        ])
        .await;
    assert!(err.contains("cannot start before"), "{err}");
    let err = cli
        .fails(&["device", "set", id, "--site-since", "2026-10-15"])
        .await;
    assert!(err.contains("--site"), "{err}");
    let october = cli
        .json(&[
            "report",
            "create",
            "--scope",
            "site",
            "--subject",
            "house",
            "--month",
            "2026-10",
        ])
        .await;
    assert_eq!(october["content"]["energy_wh"].as_f64(), Some(897.0));
    hub.stop().await.unwrap();
}
