//! `drover fleet`: create, list, show and change fleets.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Subcommand, ValueEnum};
use serde_json::{Value, json};

use super::field;
use crate::Ctx;
use crate::table;

/// `drover fleet ...`.
#[derive(Debug, Subcommand)]
pub enum FleetCommand {
    /// Create a fleet and print its provisioning key (shown only once).
    Create {
        /// The fleet's name.
        name: String,
        /// Accept new devices at once (otherwise each waits for 'drover device accept').
        #[arg(long)]
        auto_accept: bool,
        /// The release public key (ed25519:...), as printed by 'drover keys generate'.
        #[arg(long)]
        release_key: Option<String>,
        /// Seconds between device check-ins.
        #[arg(long)]
        poll_interval: Option<i64>,
    },
    /// List fleets.
    List,
    /// Show a fleet's settings and targets.
    Show {
        /// The fleet.
        name: String,
    },
    /// Change a fleet's settings.
    Set {
        /// The fleet.
        name: String,
        /// Accept new devices at once.
        #[arg(long)]
        auto_accept: Option<bool>,
        /// The release public key (ed25519:...).
        #[arg(long)]
        release_key: Option<String>,
        /// Seconds between device check-ins.
        #[arg(long)]
        poll_interval: Option<i64>,
        /// The fleet's config: a JSON file holding an object (replaces the old config).
        #[arg(long)]
        config_file: Option<PathBuf>,
        /// Serve the seed updater protocol for this fleet, so devices running the original
        /// updater keep working (off by default).
        #[arg(long)]
        seed_protocol: Option<OnOff>,
        /// Number the next release from here (for fleets moving from the seed hub, so snapshot
        /// IDs continue).
        #[arg(long)]
        next_release_seq: Option<i64>,
    },
    /// Replace the provisioning key; the old one stops working at once.
    RotateKey {
        /// The fleet.
        name: String,
    },
}

/// `on` or `off`.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum OnOff {
    /// On.
    On,
    /// Off.
    Off,
}

/// Runs `drover fleet ...`.
pub async fn run(ctx: &Ctx, command: FleetCommand) -> anyhow::Result<ExitCode> {
    let client = ctx.client()?;
    match command {
        FleetCommand::Create {
            name,
            auto_accept,
            release_key,
            poll_interval,
        } => {
            let created: Value = client
                .post(
                    "/api/v1/fleets",
                    &json!({
                        "name": name,
                        "auto_accept": auto_accept,
                        "release_key": release_key,
                        "poll_interval_s": poll_interval,
                    }),
                )
                .await?;
            if ctx.json() {
                return ctx.print_json(&created).map(|()| ExitCode::SUCCESS);
            }
            println!("Created fleet {name}.");
            println!(
                "Provisioning key (put it in each agent's config as provisioning_key; shown only now):"
            );
            println!("  {}", field(&created, "provisioning_key"));
            if created["fleet"]["release_key"].is_null() {
                println!(
                    "Next: 'drover keys generate', then 'drover fleet set {name} --release-key <public key>'."
                );
            }
        }
        FleetCommand::List => {
            let fleets: Value = client.get("/api/v1/fleets").await?;
            if ctx.json() {
                return ctx.print_json(&fleets).map(|()| ExitCode::SUCCESS);
            }
            let rows: Vec<Vec<String>> = fleets
                .as_array()
                .into_iter()
                .flatten()
                .map(|f| {
                    vec![
                        field(f, "name"),
                        if f["auto_accept"] == true {
                            "auto"
                        } else {
                            "manual"
                        }
                        .into(),
                        format!("{}s", field(f, "poll_interval_s")),
                        targets(f),
                        if f["seed_base_path"].is_null() {
                            "off"
                        } else {
                            "on"
                        }
                        .into(),
                    ]
                })
                .collect();
            print!(
                "{}",
                table::render(&["NAME", "ACCEPT", "POLL", "TARGETS", "SEED"], &rows)
            );
        }
        FleetCommand::Show { name } => {
            let fleet: Value = client.get(&format!("/api/v1/fleets/{name}")).await?;
            print_fleet(ctx, &client, &fleet)?;
        }
        FleetCommand::Set {
            name,
            auto_accept,
            release_key,
            poll_interval,
            config_file,
            seed_protocol,
            next_release_seq,
        } => {
            let config = match config_file {
                Some(path) => Some(read_json_object(&path)?),
                None => None,
            };
            let fleet: Value = client
                .patch(
                    &format!("/api/v1/fleets/{name}"),
                    &json!({
                        "auto_accept": auto_accept,
                        "release_key": release_key,
                        "poll_interval_s": poll_interval,
                        "config": config,
                        "seed_protocol": seed_protocol.map(|s| matches!(s, OnOff::On)),
                        "next_release_seq": next_release_seq,
                    }),
                )
                .await?;
            print_fleet(ctx, &client, &fleet)?;
        }
        FleetCommand::RotateKey { name } => {
            let answer: Value = client
                .post(
                    &format!("/api/v1/fleets/{name}/provisioning-key"),
                    &json!({}),
                )
                .await?;
            if ctx.json() {
                return ctx.print_json(&answer).map(|()| ExitCode::SUCCESS);
            }
            println!("New provisioning key for {name} (the old one no longer works):");
            println!("  {}", field(&answer, "provisioning_key"));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Reads a JSON file that must hold an object.
pub fn read_json_object(path: &std::path::Path) -> anyhow::Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let value: Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", path.display()))?;
    anyhow::ensure!(
        value.is_object(),
        "{} must hold a JSON object, such as {{\"meter\": {{\"name\": \"123\"}}}}",
        path.display()
    );
    Ok(value)
}

fn targets(fleet: &Value) -> String {
    let targets: Vec<String> = fleet["targets"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| format!("{}={}", field(t, "device_type"), field(t, "release")))
        .collect();
    if targets.is_empty() {
        "-".into()
    } else {
        targets.join(",")
    }
}

fn print_fleet(ctx: &Ctx, client: &crate::client::HubClient, fleet: &Value) -> anyhow::Result<()> {
    if ctx.json() {
        return ctx.print_json(fleet);
    }
    println!("Fleet:        {}", field(fleet, "name"));
    println!(
        "Accept:       {}",
        if fleet["auto_accept"] == true {
            "automatically"
        } else {
            "by an operator"
        }
    );
    println!("Poll:         every {}s", field(fleet, "poll_interval_s"));
    println!("Release key:  {}", field(fleet, "release_key"));
    println!("Targets:      {}", targets(fleet));
    println!("Next release: #{}", field(fleet, "next_release_seq"));
    match fleet["seed_base_path"].as_str() {
        Some(path) => println!("Seed protocol: on, at {}{path}", client.base()),
        None => println!("Seed protocol: off"),
    }
    println!("Config:       {}", fleet["config"]);
    Ok(())
}
