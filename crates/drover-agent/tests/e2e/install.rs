//! Signed updates installed end to end: the `script` module (tar.gz and zip, the seed
//! environment) and the `app` module (release directories, the `current` symlink, stop, start
//! and health commands), on both engines, and once over TLS with the hub's own CA.

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

use drover_protocol::device::{Module, UpdatePhase};
use drover_test_support::{Engine, TestHub, tar_gz, zip};
use serde_json::json;

use crate::common::{
    DEVICE_TYPE, Device, Fleet, final_states, marker_script, read_json, script_release,
};

both_engines!(
    a_script_release_runs_update_sh_with_the_seed_environment,
    an_app_release_is_swapped_in_behind_the_current_symlink,
    an_update_over_tls_trusts_the_hubs_own_ca,
);

/// An update.sh, one folder down, that writes what it was given into `dir`.
fn env_reporter(dir: &Path) -> String {
    format!(
        "#!/bin/sh\nset -e\n{{\n  echo \"apps_root=$apps_root\"\n  echo \"update_root=$update_root\"\n  \
         echo \"config=$config\"\n  echo \"config_file=$DROVER_CONFIG_FILE\"\n  \
         echo \"release=$DROVER_RELEASE\"\n  echo \"pwd=$(pwd -P)\"\n}} > {env}\n\
         cp \"$DROVER_CONFIG_FILE\" {copy}\necho installed\necho to stderr >&2\n",
        env = dir.join("env.txt").display(),
        copy = dir.join("config-file.json").display(),
    )
}

async fn a_script_release_runs_update_sh_with_the_seed_environment(engine: Engine) {
    let Some(fleet) = Fleet::start(engine).await else {
        return;
    };
    let config = json!({"greeting": "hello", "meter": {"name": "a b"}});
    fleet.set_config(config.clone()).await;
    let device = Device::new(&fleet);
    let artifact = tar_gz(&[(
        "bundle/update.sh",
        env_reporter(device.dir.path()).as_bytes(),
        0o755,
    )]);
    fleet.deploy("1.0", Module::Script, &artifact).await;
    let agent = device.start();
    let id = device.wait_enrolled().await;
    fleet.wait_current(&id, "1.0").await;
    agent.stop().await;

    // What update.sh was given.
    let state_dir = &device.config.state_dir;
    let env = fs::read_to_string(device.path("env.txt")).unwrap();
    let folder = state_dir.join("work/1.0/bundle");
    let line = |name: &str| {
        env.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("no {name} in {env}"))
            .to_string()
    };
    assert_eq!(
        line("apps_root"),
        state_dir.join("apps").display().to_string()
    );
    assert_eq!(line("update_root"), folder.display().to_string());
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&line("config")).unwrap(),
        config
    );
    assert_eq!(
        line("config_file"),
        state_dir.join("config.json").display().to_string()
    );
    assert_eq!(read_json(&device.path("config-file.json")), config);
    assert_eq!(line("release"), "1.0");
    // The folder is removed after the install; its canonical path was the working directory.
    let canonical_state = state_dir.canonicalize().unwrap();
    assert_eq!(
        line("pwd"),
        canonical_state
            .join("work/1.0/bundle")
            .display()
            .to_string()
    );

    // The hub's view: enrolled at once, facts reported, the attempt and its output.
    let view = fleet.device(&id).await;
    assert_eq!(view["status"], "accepted");
    assert_eq!(view["device_type"], DEVICE_TYPE);
    assert_eq!(view["agent_version"], drover_agent::AGENT_VERSION);
    assert_eq!(view["facts"]["tags"], json!(["lab"]));
    assert_eq!(view["current_release"], "1.0");
    assert_eq!(view["update"]["phase"], "idle");
    let attempts = fleet.attempts(&id).await;
    assert_eq!(attempts.len(), 1, "{attempts:?}");
    assert_eq!(attempts[0].attempt, 1);
    assert_eq!(
        attempts[0].states(),
        vec!["downloading", "installing", "success"]
    );
    assert_eq!(
        attempts[0].output.as_deref(),
        Some("installed\nto stderr\n")
    );

    // The device's view agrees.
    let status = device.status();
    assert_eq!(status.device_id.as_deref(), Some(id.as_str()));
    assert_eq!(status.current_release.as_deref(), Some("1.0"));
    assert_eq!(status.update.phase, UpdatePhase::Idle);
    assert_eq!(status.pending_reports, 0);
    for (file, mode) in [("identity.key", 0o600), ("credential", 0o600)] {
        let meta = fs::metadata(state_dir.join(file)).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, mode, "{file}");
    }
    assert_eq!(read_json(&state_dir.join("config.json")), config);
}

#[tokio::test]
async fn a_zip_script_release_without_the_executable_bit_runs() {
    let fleet = Fleet::sqlite().await;
    let device = Device::new(&fleet);
    let ran = device.path("ran");
    let body = format!(
        "#!/bin/sh\necho \"$DROVER_RELEASE\" > {}\necho zipped\n",
        ran.display()
    );
    // Zips made on other systems often carry no Unix mode bits worth trusting.
    fleet
        .deploy(
            "1.1",
            Module::Script,
            &zip(&[("update.sh", body.as_bytes(), 0o644)]),
        )
        .await;
    let agent = device.start();
    let id = device.wait_enrolled().await;
    fleet.wait_current(&id, "1.1").await;
    agent.stop().await;

    assert_eq!(fs::read_to_string(ran).unwrap(), "1.1\n");
    let attempts = fleet.attempts(&id).await;
    assert_eq!(final_states(&attempts), vec!["success"]);
    assert_eq!(attempts[0].output.as_deref(), Some("zipped\n"));
}

fn app_archive(version: &str) -> Vec<u8> {
    tar_gz(&[
        ("VERSION", version.as_bytes(), 0o644),
        ("bin/run.sh", b"#!/bin/sh\n", 0o755),
    ])
}

async fn an_app_release_is_swapped_in_behind_the_current_symlink(engine: Engine) {
    let Some(fleet) = Fleet::start(engine).await else {
        return;
    };
    let mut device = Device::new(&fleet);
    let log = device.path("commands.log");
    device.config.app.stop = Some(format!(
        "echo stop $DROVER_RELEASE $(basename $PWD) >> {}",
        log.display()
    ));
    device.config.app.start = Some(format!(
        "echo start $DROVER_RELEASE $(basename $PWD) >> {}; touch started",
        log.display()
    ));
    device.config.app.health = Some("test -f started && test -f VERSION".into());
    fleet.deploy("2.0", Module::App, &app_archive("2.0")).await;
    let agent = device.start();
    let id = device.wait_enrolled().await;
    fleet.wait_current(&id, "2.0").await;
    fleet.deploy("2.1", Module::App, &app_archive("2.1")).await;
    fleet.wait_current(&id, "2.1").await;
    agent.stop().await;

    let current = device.app_root().join("current");
    assert_eq!(fs::read_link(&current).unwrap(), Path::new("releases/2.1"));
    assert_eq!(fs::read_to_string(current.join("VERSION")).unwrap(), "2.1");
    assert!(current.join("started").exists());
    // No stop on the first install; the old release stopped in its own directory.
    assert_eq!(
        fs::read_to_string(&log).unwrap(),
        "start 2.0 2.0\nstop 2.0 2.0\nstart 2.1 2.1\n"
    );
    let mut kept: Vec<String> = fs::read_dir(device.app_root().join("releases"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    kept.sort();
    assert_eq!(
        kept,
        vec!["2.0", "2.1"],
        "the current and the previous release"
    );

    let attempts = fleet.attempts(&id).await;
    let summary: Vec<(&str, Vec<&str>)> = attempts
        .iter()
        .map(|a| (a.release.as_str(), a.states()))
        .collect();
    assert_eq!(
        summary,
        vec![
            ("2.0", vec!["downloading", "installing", "success"]),
            ("2.1", vec!["downloading", "installing", "success"]),
        ]
    );
    assert_eq!(device.status().current_release.as_deref(), Some("2.1"));
}

async fn an_update_over_tls_trusts_the_hubs_own_ca(engine: Engine) {
    let hub = TestHub::start_with(engine, |config| {
        config.tls = Some(drover_hub::config::TlsConfig {
            cert: None,
            key: None,
            self_signed: true,
            names: Vec::new(),
        });
    })
    .await
    .unwrap();
    let Some(hub) = hub else {
        return;
    };
    assert!(hub.url.starts_with("https://"), "{}", hub.url);
    let fleet = Fleet::on(hub, true).await;
    let device = Device::new(&fleet);
    assert_eq!(device.config.ca_file, fleet.hub.hub.ca_file);
    assert!(device.config.ca_file.is_some());
    let ran = device.path("ran");
    fleet
        .deploy(
            "3.0",
            Module::Script,
            &script_release(&marker_script(&ran, "tls")),
        )
        .await;
    let agent = device.start();
    let id = device.wait_enrolled().await;
    fleet.wait_current(&id, "3.0").await;
    agent.stop().await;
    assert_eq!(fs::read_to_string(ran).unwrap(), "tls\n");
    assert_eq!(final_states(&fleet.attempts(&id).await), vec!["success"]);

    // A client offering HTTP/2 (as the agent does) gets it: HPACK keeps repeated headers such
    // as the credential to a byte or two per telemetry batch.
    let ca = fs::read(fleet.hub.hub.ca_file.as_ref().unwrap()).unwrap();
    let client = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(&ca).unwrap()])
        .build()
        .unwrap();
    let response = client
        .get(format!("{}/api/v1/openapi.json", fleet.hub.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
}
