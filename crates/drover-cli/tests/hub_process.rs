//! `drover hub` as a real process: configured by file, environment and flags, serving HTTPS
//! from its own local CA, killed with SIGKILL and started again on the same data directory
//! with everything still there.

#![allow(clippy::unwrap_used, reason = "a panic is how a test fails")]

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{Child, Command};

/// Starts `drover hub` and waits for its banner; returns the child and its URL.
async fn start_hub(args: &[&str], envs: &[(&str, &str)]) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_drover"))
        .arg("hub")
        .args(args)
        .envs(envs.iter().copied())
        .env("RUST_LOG", "warn")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let url = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(url) = line.strip_prefix("Drover hub at ") {
                return url.trim().to_string();
            }
        }
        panic!("the hub exited before it was ready");
    })
    .await
    .expect("the hub did not start within 30s");
    // Keep draining stderr so the hub never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, url)
}

fn client(ca: &Path) -> reqwest::Client {
    drover_test_support::install_crypto();
    let pem = std::fs::read(ca).unwrap();
    reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
        .build()
        .unwrap()
}

#[tokio::test]
async fn the_hub_process_survives_sigkill_with_its_data_tls_and_token() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = dir.path().join("hub.toml");
    // The file names the data directory and the TLS mode; the environment sets the poll
    // interval; a flag sets the address.
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\ndefault_poll_interval_s = 30\n[tls]\nself_signed = true\nnames = [\"hub.test\"]\n",
            data.to_str().unwrap()
        ),
    )
    .unwrap();
    let config_arg = config.to_str().unwrap();
    let (mut hub, url) = start_hub(
        &["--config", config_arg, "--listen", "127.0.0.1:0"],
        &[("DROVER_DEFAULT_POLL_INTERVAL", "45")],
    )
    .await;
    assert!(url.starts_with("https://127.0.0.1:"), "{url}");
    let token_file = data.join("admin-token");
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        std::fs::metadata(&token_file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let token = std::fs::read_to_string(&token_file)
        .unwrap()
        .trim()
        .to_string();
    let ca = data.join("tls/ca.pem");
    let http = client(&ca);
    let created: serde_json::Value = http
        .post(format!("{url}/api/v1/fleets"))
        .bearer_auth(&token)
        .json(&serde_json::json!({"name": "solar"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(created["fleet"]["poll_interval_s"], 45);
    // Plain HTTP to an HTTPS port gets nothing useful.
    let plain = reqwest::get(url.replace("https://", "http://")).await;
    assert!(plain.map(|r| !r.status().is_success()).unwrap_or(true));

    hub.start_kill().unwrap();
    hub.wait().await.unwrap();
    let ca_before = std::fs::read(&ca).unwrap();

    let port = url.rsplit(':').next().unwrap().to_string();
    let listen = format!("127.0.0.1:{port}");
    let (_hub, url2) = start_hub(&["--config", config_arg, "--listen", &listen], &[]).await;
    assert_eq!(url2, url);
    assert_eq!(
        std::fs::read(&ca).unwrap(),
        ca_before,
        "the CA is reused, not remade"
    );
    let fleets: serde_json::Value = http
        .get(format!("{url}/api/v1/fleets"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(fleets[0]["name"], "solar");
}

#[tokio::test]
async fn a_bad_hub_config_is_an_error_message_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("hub.toml");
    std::fs::write(&config, "data_dir = '/tmp/x'\nlisten = 'not an address'\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_drover"))
        .args(["hub", "--config", config.to_str().unwrap()])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("hub.toml") && stderr.contains("listen"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");

    let out = Command::new(env!("CARGO_BIN_EXE_drover"))
        .args([
            "hub",
            "--data-dir",
            dir.path().to_str().unwrap(),
            "--database-url",
            "mysql://x",
        ])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("unsupported database URL"), "{stderr}");
}

#[tokio::test]
async fn organizations_are_made_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_drover"))
        .args(["hub", "org", "create", "acme", "--data-dir", data])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap();
    assert!(token.trim().starts_with("drv_o_"), "{token}");
    let out = Command::new(env!("CARGO_BIN_EXE_drover"))
        .args(["hub", "org", "list", "--data-dir", data])
        .output()
        .await
        .unwrap();
    assert_eq!(String::from_utf8(out.stdout).unwrap(), "acme\n");
}

/// The points the hub holds for a device's meter, through the API.
async fn stored(api: &drover_test_support::Api, device: &str, meter: &str) -> Vec<i64> {
    let (status, series) = api
        .get(&format!("/api/v1/series?device={device}&meter={meter}"))
        .await
        .unwrap();
    assert_eq!(status, 200, "{series}");
    let Some(id) = series
        .as_array()
        .and_then(|s| s.first())
        .map(|s| s["id"].clone())
    else {
        return Vec::new();
    };
    let (status, data) = api
        .get(&format!(
            "/api/v1/series/{id}/data?from=0&to=99999999999999"
        ))
        .await
        .unwrap();
    assert_eq!(status, 200, "{data}");
    data["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p[1].as_f64().unwrap() as i64)
        .collect()
}

/// `drover hub` SIGKILLed twice while an agent sends telemetry, and started again on the same
/// data directory: nothing it acknowledged is lost (the agent deleted those readings from its
/// spool), nothing is stored twice, and the agent's spool drains once the hub is back. The
/// agent reads a counting meter (each reading the next number), so the values tell what is
/// missing or doubled.
#[tokio::test]
async fn a_hub_killed_during_ingest_keeps_every_acknowledged_reading_once() {
    use drover_agent::config::{AgentConfig, Secret, TelemetryConfig};
    use drover_agent::meters::config::CommandSourceConfig;
    use drover_test_support::{Api, wait_until};

    let patience = Duration::from_secs(60);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data_arg = data.to_str().unwrap().to_string();
    // The folder never folds on its own here: acknowledged batches stay landed until a query
    // folds them, so the kills find landed batches not yet folded, which the hub started
    // again must fold (once) when asked. The file leaves the data directory to the flag.
    let config = dir.path().join("hub.toml");
    std::fs::write(&config, "ingest_fold_delay_ms = 600000\n").unwrap();
    let config_arg = config.to_str().unwrap().to_string();
    let (mut hub, url) = start_hub(
        &[
            "--config",
            &config_arg,
            "--data-dir",
            &data_arg,
            "--listen",
            "127.0.0.1:0",
        ],
        &[],
    )
    .await;
    let listen = url.trim_start_matches("http://").to_string();
    let token = std::fs::read_to_string(data.join("admin-token")).unwrap();
    let api = Api::new(&url, token.trim());
    let (provisioning_key, _) = api.create_fleet("lab", true, 1).await.unwrap();

    let counter = dir.path().join("counter");
    let mut config = AgentConfig {
        hub_url: url.clone(),
        provisioning_key: Some(Secret::new(provisioning_key)),
        state_dir: dir.path().join("agent"),
        device_type: "test".into(),
        ..AgentConfig::default()
    };
    config.poll.min_interval = Duration::from_millis(100);
    config.poll.max_interval = Duration::from_millis(200);
    config.poll.default_interval = Duration::from_millis(100);
    config.poll.error_backoff_max = Duration::from_secs(1);
    config.telemetry = TelemetryConfig {
        batch_interval: Duration::from_millis(200),
        ..TelemetryConfig::default()
    };
    config.spool.sync_interval = Duration::from_millis(20);
    config.meters.command.push(CommandSourceConfig {
        name: "counter".into(),
        command: format!(
            "n=$(cat {f} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {f}.tmp && mv {f}.tmp {f} && echo \"counter energy_import $n\"",
            f = counter.display()
        ),
        interval: Duration::from_millis(100),
        ..CommandSourceConfig::default()
    });
    let run = |config: AgentConfig| {
        let shutdown = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(drover_agent::run(config, shutdown.clone()));
        (shutdown, task)
    };
    config.validate().unwrap();
    let (stop, agent) = run(config.clone());
    let device = wait_until(patience, "the device to enrol", || async {
        drover_agent::status(&config.state_dir).unwrap().device_id
    })
    .await;

    for round in 1..=2 {
        wait_until(patience, "points stored", || async {
            (stored(&api, &device, "counter").await.len() >= round * 20).then_some(())
        })
        .await;
        hub.start_kill().unwrap();
        hub.wait().await.unwrap();
        (hub, _) = start_hub(
            &[
                "--config",
                &config_arg,
                "--data-dir",
                &data_arg,
                "--listen",
                &listen,
            ],
            &[],
        )
        .await;
    }
    wait_until(patience, "points after the restarts", || async {
        (stored(&api, &device, "counter").await.len() >= 60).then_some(())
    })
    .await;

    // Stop reading, then let the agent drain its spool without the meter.
    stop.cancel();
    agent.await.unwrap().unwrap();
    config.meters.command.clear();
    let last_seen = |d: &serde_json::Value| d["last_seen"].as_i64().unwrap_or(0);
    let (_, before) = api.get(&format!("/api/v1/devices/{device}")).await.unwrap();
    let before = last_seen(&before);
    let (stop, agent) = run(config.clone());
    // A check-in of this run (its last-seen is newer) reporting an empty spool.
    wait_until(patience, "the spool to drain", || async {
        let (_, d) = api.get(&format!("/api/v1/devices/{device}")).await.unwrap();
        (last_seen(&d) > before && d["telemetry"]["spooled"] == 0).then_some(())
    })
    .await;
    stop.cancel();
    agent.await.unwrap().unwrap();

    let spool =
        drover_agent::spool::Spool::open(&config.state_dir.join("spool"), &config.spool).unwrap();
    assert_eq!(spool.pending_readings(), 0);
    assert_eq!(spool.dropped_total(), 0);
    let appended = spool.appended_total();
    drop(spool);
    let values = stored(&api, &device, "counter").await;
    assert!(
        values.windows(2).all(|w| w[0] < w[1]),
        "values not unique and rising: {values:?}"
    );
    assert_eq!(values.len() as u64, appended, "stored {values:?}");
    let (_, shown) = api.get(&format!("/api/v1/devices/{device}")).await.unwrap();
    assert_eq!(
        shown["duplicate_points"], 0,
        "no reading came under two numbers"
    );
}
