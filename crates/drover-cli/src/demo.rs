//! `drover demo`: a whole fleet on one machine. It starts a hub (embedded SQLite, TLS with a
//! local CA) in a data directory, enrols N agents on loopback (each with its own state
//! directory and a simulated solar meter read every 2 s), builds and signs a release, deploys
//! it and shows the fleet converge, then waits for every device's first readings to be stored.
//!
//! The hub and the agents are the real ones, run in this process; the demo itself drives the
//! hub only through its API, like any other CLI command.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Args;
use drover_agent::AgentConfig;
use drover_hub::HubConfig;
use drover_hub::config::TlsConfig;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::Ctx;
use crate::client::HubClient;
use crate::cmd::field;
use crate::cmd::release::{CreateArgs, ModuleArg};
use crate::cmd::status::Watch;

/// The fleet the demo creates.
pub const DEMO_FLEET: &str = "demo";
/// The release it deploys.
pub const DEMO_VERSION: &str = "1.0.0";
/// The device type of its agents.
pub const DEMO_DEVICE_TYPE: &str = "demo-pi";

/// `drover demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// How many agents to run.
    #[arg(long, default_value_t = 20)]
    devices: usize,
    /// Exit 0 once every device runs the release (non-zero, with the reason, on timeout).
    #[arg(long)]
    until_converged: bool,
    /// Seconds to wait for enrolment and convergence.
    #[arg(long, default_value_t = 180)]
    timeout: u64,
    /// The data directory (must be empty or absent; default: a new temporary directory).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Where the hub listens.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: std::net::SocketAddr,
    /// Serve plain HTTP instead of HTTPS with a local CA.
    #[arg(long)]
    no_tls: bool,
}

/// Runs `drover demo`.
pub async fn run(ctx: &Ctx, args: DemoArgs) -> anyhow::Result<ExitCode> {
    if args.devices == 0 || args.devices > 2000 {
        bail!("--devices must be 1 to 2000, got {}", args.devices);
    }
    let data_dir = prepare_data_dir(args.data_dir.as_deref())?;
    let shutdown = CancellationToken::new();
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.timeout);

    let mut config = HubConfig::new(data_dir.join("hub"));
    config.listen = args.listen;
    config.presence_flush_ms = 1000;
    config.default_poll_interval_s = 2;
    if !args.no_tls {
        config.tls = Some(TlsConfig {
            cert: None,
            key: None,
            self_signed: true,
            names: Vec::new(),
        });
    }
    let hub = drover_hub::start(config, shutdown.clone())
        .await
        .context("starting the demo hub")?;
    let token = hub
        .admin_token
        .clone()
        .context("the demo hub made no admin token")?;
    let client = HubClient::new(&hub.url, &token, hub.ca_file.as_deref())?;
    eprintln!("Drover demo");
    eprintln!("  hub:          {}", hub.url);
    eprintln!("  data:         {}", data_dir.display());
    eprintln!("  admin token:  {token}");
    if let Some(ca) = &hub.ca_file {
        eprintln!("  CA file:      {}", ca.display());
    }

    let outcome = demo(
        ctx, &args, &client, &hub, &data_dir, &shutdown, started, deadline,
    )
    .await;
    let code = match outcome {
        Ok(()) if args.until_converged => ExitCode::SUCCESS,
        Ok(()) => {
            let ca = hub
                .ca_file
                .as_ref()
                .map(|ca| format!(" --ca {}", ca.display()))
                .unwrap_or_default();
            eprintln!("\nThe fleet runs on; try, in another terminal:");
            eprintln!("  drover login --hub {} --token {token}{ca}", hub.url);
            eprintln!("  drover device list");
            eprintln!("  drover status --watch");
            eprintln!("  drover series list");
            eprintln!(
                "  drover report create --scope meter --subject <device>/<meter> --from <YYYY-MM-DD>"
            );
            eprintln!("Press Ctrl-C to stop.");
            crate::cmd::shutdown_signal().await;
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    };
    eprintln!("stopping the agents and the hub...");
    shutdown.cancel();
    hub.wait().await?;
    Ok(code)
}

#[allow(
    clippy::too_many_arguments,
    reason = "one call site; a struct would only rename them"
)]
async fn demo(
    ctx: &Ctx,
    args: &DemoArgs,
    client: &HubClient,
    hub: &drover_hub::RunningHub,
    data_dir: &Path,
    shutdown: &CancellationToken,
    started: Instant,
    deadline: Instant,
) -> anyhow::Result<()> {
    let key_path = data_dir.join("release.key");
    let key = drover_protocol::signing::ReleaseSigningKey::generate();
    std::fs::write(&key_path, key.to_text())?;
    let created: Value = client
        .post(
            "/api/v1/fleets",
            &json!({
                "name": DEMO_FLEET,
                "auto_accept": true,
                "release_key": key.public().to_string(),
                "poll_interval_s": 2,
            }),
        )
        .await?;
    let provisioning_key = field(&created, "provisioning_key");
    client
        .patch(
            &format!("/api/v1/fleets/{DEMO_FLEET}"),
            &json!({"config": {"greeting": "hello from the demo fleet"}}),
        )
        .await
        .map(|_: Value| ())?;

    eprintln!("Starting {} agents...", args.devices);
    for n in 1..=args.devices {
        let config = agent_config(
            hub,
            &provisioning_key,
            &data_dir.join("agents").join(format!("agent-{n:03}")),
            n,
        );
        let token = shutdown.child_token();
        tokio::spawn(async move {
            if let Err(e) = drover_agent::run(config, token).await {
                tracing::error!(agent = n, error = format!("{e:#}"), "demo agent stopped");
            }
        });
    }
    wait_for_enrolment(client, args.devices, deadline).await?;
    eprintln!(
        "  {} devices enrolled in {:.1}s",
        args.devices,
        started.elapsed().as_secs_f64()
    );

    let artifact = data_dir.join(format!("demo-app-{DEMO_VERSION}.tar.gz"));
    std::fs::write(&artifact, demo_archive(DEMO_VERSION)?)?;
    eprintln!("Signing and uploading release {DEMO_VERSION} (app module)...");
    let create = CreateArgs {
        fleet: DEMO_FLEET.into(),
        version: DEMO_VERSION.into(),
        module: ModuleArg::App,
        device_type: None,
        notes: "the demo app".into(),
        key: key_path,
        quiet: true,
        file: artifact,
    };
    crate::cmd::release::create_release(client, &create, &key).await?;
    client
        .post(
            &format!("/api/v1/fleets/{DEMO_FLEET}/deploy"),
            &json!({"release": DEMO_VERSION}),
        )
        .await
        .map(|_: Value| ())?;
    let deployed = Instant::now();
    eprintln!("Deployed {DEMO_VERSION}; the fleet converges:");
    let watch = Watch::new(&[DEMO_FLEET.to_string()]);
    loop {
        let statuses = watch.refresh(client).await?;
        let status = &statuses[0];
        let all = status["accepted"].as_u64() == Some(args.devices as u64);
        if all && status["converged"] == true {
            watch.finish();
            eprintln!(
                "Converged: {} devices run {DEMO_VERSION}, {:.1}s after the deploy.",
                args.devices,
                deployed.elapsed().as_secs_f64()
            );
            wait_for_data(client, args.devices, deadline).await?;
            if ctx.json() {
                ctx.print_json(status)?;
            }
            return Ok(());
        }
        if Instant::now() > deadline {
            watch.finish();
            return Err(not_converged(client, args.timeout).await);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The data directory: the one given (which must be empty) or a new temporary one.
fn prepare_data_dir(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    let dir = match given {
        Some(dir) => dir.to_path_buf(),
        None => std::env::temp_dir().join(format!(
            "drover-demo-{}",
            drover_protocol::ids::random_string(b"abcdefghjkmnpqrtuvwxyz23456789", 6)
        )),
    };
    if dir.exists() && std::fs::read_dir(&dir)?.next().is_some() {
        bail!(
            "{} is not empty; give the demo an empty or new directory with --data-dir",
            dir.display()
        );
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(std::fs::canonicalize(&dir)?)
}

fn agent_config(
    hub: &drover_hub::RunningHub,
    provisioning_key: &str,
    state_dir: &Path,
    n: usize,
) -> AgentConfig {
    let mut config = AgentConfig {
        hub_url: hub.url.clone(),
        ca_file: hub.ca_file.clone(),
        provisioning_key: Some(drover_agent::Secret::new(provisioning_key)),
        state_dir: state_dir.to_path_buf(),
        device_type: DEMO_DEVICE_TYPE.into(),
        tags: vec!["demo".into()],
        ..AgentConfig::default()
    };
    config
        .attributes
        .insert("site".into(), format!("Demo street {n}"));
    config.poll.min_interval = Duration::from_millis(500);
    config.poll.default_interval = Duration::from_secs(2);
    config.poll.error_backoff_max = Duration::from_secs(5);
    config.retry.base = Duration::from_secs(5);
    config.app.start = Some("./app.sh start".into());
    config.app.stop = Some("./app.sh stop".into());
    config.app.health = Some("./app.sh health".into());
    config.app.health_interval = Duration::from_millis(300);
    config.app.health_window = Duration::from_secs(30);
    // A simulated solar meter, read every 2 s; batches every 10 s so charts fill quickly.
    config
        .meters
        .simulated
        .push(drover_agent::meters::config::SimulatedSourceConfig {
            name: format!("solar-{n:03}"),
            peak_power_w: 3000 + (n as u32 * 397) % 7000,
            seed: n as u64,
            ..Default::default()
        });
    config.telemetry.batch_interval = Duration::from_secs(10);
    config
}

/// Waits until every demo device has readings stored at the hub, and says how to see them.
async fn wait_for_data(
    client: &HubClient,
    devices: usize,
    deadline: Instant,
) -> anyhow::Result<()> {
    loop {
        let series: Value = client.get("/api/v1/series?channel=power").await?;
        let series = series.as_array().cloned().unwrap_or_default();
        let with_data = series
            .iter()
            .filter(|s| s["points"].as_u64().unwrap_or(0) > 0)
            .count();
        if with_data >= devices {
            eprintln!(
                "Data: {with_data} meters report every 2 s; for example (power in W, 1-minute averages):"
            );
            if let Some(first) = series.first() {
                eprintln!(
                    "  drover query {} --resolution 1m --agg avg",
                    field(first, "id")
                );
            }
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("only {with_data} of {devices} devices had readings stored before the timeout");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The demo release: a tiny app whose start, stop and health commands are one script.
fn demo_archive(version: &str) -> anyhow::Result<Vec<u8>> {
    let app = "#!/bin/sh\n\
        # The demo app: 'start' records the version, 'health' checks it, 'stop' forgets it.\n\
        case \"$1\" in\n\
          start) cat VERSION > ../../running ;;\n\
          stop) rm -f ../../running ;;\n\
          health) test \"$(cat ../../running 2>/dev/null)\" = \"$(cat VERSION)\" ;;\n\
        esac\n";
    let encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let mut builder = tar::Builder::new(encoder);
    for (name, contents, mode) in [
        ("VERSION", format!("{version}\n"), 0o644),
        ("app.sh", app.to_string(), 0o755),
    ] {
        let mut header = tar::Header::new_gnu();
        header.set_size(contents.len() as u64);
        header.set_mode(mode);
        header.set_entry_type(tar::EntryType::Regular);
        builder.append_data(&mut header, name, contents.as_bytes())?;
    }
    Ok(builder.into_inner()?.finish()?)
}

async fn wait_for_enrolment(
    client: &HubClient,
    devices: usize,
    deadline: Instant,
) -> anyhow::Result<()> {
    loop {
        let status: Value = client
            .get(&format!("/api/v1/fleets/{DEMO_FLEET}/status"))
            .await?;
        if status["accepted"].as_u64().unwrap_or(0) >= devices as u64 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "only {} of {devices} agents enrolled before the timeout",
                field(&status, "accepted")
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Why the fleet did not converge: each device that is not there, with its state.
async fn not_converged(client: &HubClient, timeout: u64) -> anyhow::Error {
    let devices: Value = match client
        .get(&format!("/api/v1/devices?fleet={DEMO_FLEET}"))
        .await
    {
        Ok(devices) => devices,
        Err(e) => return e.context(format!("the fleet did not converge within {timeout}s")),
    };
    let behind: Vec<String> = devices
        .as_array()
        .into_iter()
        .flatten()
        .filter(|d| d["current_release"] != d["target_release"])
        .map(|d| {
            format!(
                "{} runs {} ({} {})",
                field(d, "id"),
                field(d, "current_release"),
                field(&d["update"], "phase"),
                field(&d["update"], "message")
            )
        })
        .collect();
    anyhow::anyhow!(
        "the fleet did not converge within {timeout}s; {} device(s) behind:\n  {}",
        behind.len(),
        behind.join("\n  ")
    )
}
