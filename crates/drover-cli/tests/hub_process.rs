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
