//! `drover-agent modbus probe`, the real binary against the test gateway.

use std::process::Output;

use crate::gateway::{Gateway, MODELS};

async fn probe(args: &[&str]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_drover-agent"))
        .arg("modbus")
        .arg("probe")
        .args(args)
        .output()
        .await
        .unwrap()
}

/// The whitespace-separated columns of the line for `register`.
fn columns(stdout: &str, register: u16) -> Vec<String> {
    stdout
        .lines()
        .map(|l| l.split_whitespace().map(str::to_string).collect::<Vec<_>>())
        .find(|c| c.first().map(String::as_str) == Some(&register.to_string()))
        .unwrap_or_else(|| panic!("no line for register {register}:\n{stdout}"))
}

#[tokio::test]
async fn probe_dumps_holding_and_input_registers() {
    let gateway = Gateway::start().await;
    // An SEC meter in slot 0: serial 12345678 at 10, a 64-bit energy register at 260.
    gateway.meter(MODELS[0], 0, 12_345_678, (1 << 48) + 5);
    gateway.set_input(100, &[0x4366, 0x8000]);
    let port = gateway.port().to_string();

    let out = probe(&[
        "--host",
        "127.0.0.1",
        "--port",
        &port,
        "--start",
        "8",
        "--count",
        "4",
    ])
    .await;
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.starts_with("# 127.0.0.1:"), "{stdout}");
    assert!(stdout.contains("holding registers 8..12"), "{stdout}");
    // reg, hex, u16, i16, u32 hi-lo, u32 lo-hi, u64, f32
    let serial = columns(&stdout, 10);
    assert_eq!(
        serial[..5],
        ["10", "0x00bc", "188", "188", "12345678"],
        "{stdout}"
    );

    let out = probe(&[
        "--host",
        "127.0.0.1",
        "--port",
        &port,
        "--unit",
        "1",
        "--start",
        "260",
        "--count",
        "4",
    ])
    .await;
    let stdout = String::from_utf8(out.stdout).unwrap();
    let energy = columns(&stdout, 260);
    assert_eq!(energy[1], "0x0001", "{stdout}");
    assert_eq!(energy[6], ((1u64 << 48) + 5).to_string(), "{stdout}");

    let out = probe(&[
        "--host",
        "127.0.0.1",
        "--port",
        &port,
        "--input",
        "--start",
        "100",
        "--count",
        "2",
    ])
    .await;
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.contains("input registers 100..102"), "{stdout}");
    assert_eq!(columns(&stdout, 100)[7], "230.5000", "{stdout}");
}

#[tokio::test]
async fn probe_says_why_it_failed() {
    // A port nobody listens on.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port().to_string();
    drop(listener);
    let out = probe(&[
        "--host",
        "127.0.0.1",
        "--port",
        &port,
        "--start",
        "0",
        "--count",
        "2",
    ])
    .await;
    assert!(!out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("cannot connect"), "{stderr}");

    let out = probe(&["--host", "127.0.0.1", "--start", "65535", "--count", "2"]).await;
    assert!(!out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("--count"), "{stderr}");
}
