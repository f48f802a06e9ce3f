//! `drover device`: list, show, accept, revoke, retry, configure.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;
use serde_json::{Value, json};

use super::field;
use crate::Ctx;
use crate::table;

/// `drover device ...`.
#[derive(Debug, Subcommand)]
pub enum DeviceCommand {
    /// List devices.
    List {
        /// Only this fleet.
        #[arg(long)]
        fleet: Option<String>,
        /// Only pending, accepted or revoked devices.
        #[arg(long)]
        status: Option<String>,
    },
    /// List the device types (hardware) the organization's devices run on.
    Types,
    /// Show a device: who it is, what it runs, its last update attempts.
    Show {
        /// The device ID (as printed on its label).
        id: String,
    },
    /// Accept a pending device into its fleet.
    Accept {
        /// The device ID.
        id: String,
    },
    /// Revoke a device's credential: it is refused from now on.
    Revoke {
        /// The device ID.
        id: String,
    },
    /// Let a device try a release it gave up on (held) again.
    Retry {
        /// The device ID.
        id: String,
    },
    /// Set a device's own config or pin a release to it.
    Set {
        /// The device ID.
        id: String,
        /// The device's config: a JSON file holding an object, merged over the fleet's.
        #[arg(long)]
        config_file: Option<PathBuf>,
        /// Pin this release version to the device (overrides the fleet's target).
        #[arg(long, conflicts_with = "unpin")]
        pin: Option<String>,
        /// Remove the pin; the device follows its fleet again.
        #[arg(long)]
        unpin: bool,
        /// Assign the device to this site ("" takes it off its site).
        #[arg(long)]
        site: Option<String>,
        /// From when the site change holds: YYYY-MM-DD, RFC 3339 or Unix ms (default: from
        /// the device's first reading for its first site, else now). Reports count the device
        /// for each site only while it was there.
        #[arg(long, requires = "site")]
        site_since: Option<String>,
    },
}

/// Runs `drover device ...`.
pub async fn run(ctx: &Ctx, command: DeviceCommand) -> anyhow::Result<ExitCode> {
    let client = ctx.client()?;
    match command {
        DeviceCommand::List { fleet, status } => {
            let mut query = Vec::new();
            if let Some(fleet) = fleet {
                query.push(format!("fleet={fleet}"));
            }
            if let Some(status) = status {
                query.push(format!("status={status}"));
            }
            let path = if query.is_empty() {
                "/api/v1/devices".to_string()
            } else {
                format!("/api/v1/devices?{}", query.join("&"))
            };
            let devices: Value = client.get(&path).await?;
            if ctx.json() {
                return ctx.print_json(&devices).map(|()| ExitCode::SUCCESS);
            }
            let now = table::now_ms();
            let rows: Vec<Vec<String>> = devices
                .as_array()
                .into_iter()
                .flatten()
                .map(|d| {
                    vec![
                        field(d, "id"),
                        field(d, "fleet"),
                        field(d, "status"),
                        field(d, "current_release"),
                        field(d, "target_release"),
                        field(&d["update"], "phase"),
                        if d["online"] == true {
                            "online"
                        } else {
                            "offline"
                        }
                        .into(),
                        table::ago(d["last_seen"].as_i64(), now),
                    ]
                })
                .collect();
            print!(
                "{}",
                table::render(
                    &[
                        "ID",
                        "FLEET",
                        "STATUS",
                        "RELEASE",
                        "TARGET",
                        "UPDATE",
                        "SEEN",
                        "LAST SEEN"
                    ],
                    &rows
                )
            );
        }
        DeviceCommand::Types => {
            let types: Value = client.get("/api/v1/device-types").await?;
            if ctx.json() {
                return ctx.print_json(&types).map(|()| ExitCode::SUCCESS);
            }
            let rows: Vec<Vec<String>> = types
                .as_array()
                .into_iter()
                .flatten()
                .map(|t| vec![field(t, "name"), field(t, "arch"), field(t, "devices")])
                .collect();
            print!("{}", table::render(&["TYPE", "ARCH", "DEVICES"], &rows));
        }
        DeviceCommand::Show { id } => {
            let device: Value = client.get(&format!("/api/v1/devices/{id}")).await?;
            let attempts: Value = client
                .get(&format!("/api/v1/devices/{id}/attempts"))
                .await?;
            if ctx.json() {
                let mut both = device;
                both["attempts"] = attempts;
                return ctx.print_json(&both).map(|()| ExitCode::SUCCESS);
            }
            print_device(&device, &attempts);
        }
        DeviceCommand::Accept { id } => {
            let device: Value = client
                .post(&format!("/api/v1/devices/{id}/accept"), &json!({}))
                .await?;
            done(ctx, &device, &format!("Accepted {id}."))?;
        }
        DeviceCommand::Revoke { id } => {
            let device: Value = client
                .post(&format!("/api/v1/devices/{id}/revoke"), &json!({}))
                .await?;
            done(
                ctx,
                &device,
                &format!("Revoked {id}; it is refused from now on."),
            )?;
        }
        DeviceCommand::Retry { id } => {
            let device: Value = client
                .post(&format!("/api/v1/devices/{id}/retry"), &json!({}))
                .await?;
            done(
                ctx,
                &device,
                &format!("{id} will try its target release again at its next check-in."),
            )?;
        }
        DeviceCommand::Set {
            id,
            config_file,
            pin,
            unpin,
            site,
            site_since,
        } => {
            let config = match config_file {
                Some(path) => Some(super::fleet::read_json_object(&path)?),
                None => None,
            };
            let pin = if unpin { Some(String::new()) } else { pin };
            let device: Value = client
                .patch(
                    &format!("/api/v1/devices/{id}"),
                    &json!({
                        "config": config,
                        "pin": pin,
                        "site": site,
                        "site_since": site_since.as_deref().map(super::data::time_arg).transpose()?,
                    }),
                )
                .await?;
            done(ctx, &device, &format!("Updated {id}."))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn done(ctx: &Ctx, device: &Value, message: &str) -> anyhow::Result<()> {
    if ctx.json() {
        ctx.print_json(device)
    } else {
        println!("{message}");
        Ok(())
    }
}

fn print_device(device: &Value, attempts: &Value) {
    let now = table::now_ms();
    let facts = &device["facts"];
    println!("Device:      {}", field(device, "id"));
    println!(
        "Fleet:       {} ({})",
        field(device, "fleet"),
        field(device, "device_type")
    );
    println!("Status:      {}", field(device, "status"));
    if !device["site"].is_null() {
        println!(
            "Site:        {} (customer {})",
            field(device, "site"),
            field(device, "customer")
        );
    }
    println!(
        "Seen:        {} ({}, from {})",
        if device["online"] == true {
            "online"
        } else {
            "offline"
        },
        table::ago(device["last_seen"].as_i64(), now),
        field(device, "remote_ip")
    );
    println!(
        "Release:     {} (target {})",
        field(device, "current_release"),
        field(device, "target_release")
    );
    if !device["pinned_release"].is_null() {
        println!("Pinned:      {}", field(device, "pinned_release"));
    }
    let update = &device["update"];
    let mut line = field(update, "phase");
    if !update["release"].is_null() {
        line.push_str(&format!(" {}", field(update, "release")));
    }
    if update["failures"].as_i64().unwrap_or(0) > 0 {
        line.push_str(&format!(", {} failure(s)", field(update, "failures")));
    }
    if !update["message"].is_null() {
        line.push_str(&format!(": {}", field(update, "message")));
    }
    println!("Update:      {line}");
    println!(
        "Agent:       {} ({})",
        field(device, "agent_version"),
        field(device, "protocol")
    );
    println!(
        "System:      {} {} {} up {}s, ip {}",
        field(facts, "hostname"),
        field(facts, "os"),
        field(facts, "arch"),
        field(facts, "uptime_s"),
        field(facts, "ip")
    );
    if let Some(tags) = facts["tags"].as_array().filter(|t| !t.is_empty()) {
        let tags: Vec<String> = tags
            .iter()
            .map(|t| t.as_str().unwrap_or("").to_string())
            .collect();
        println!("Tags:        {}", tags.join(", "));
    }
    if let Some(attrs) = facts["attributes"].as_object().filter(|a| !a.is_empty()) {
        for (k, v) in attrs {
            println!("Attribute:   {k} = {}", v.as_str().unwrap_or(""));
        }
    }
    println!("Config:      {}", device["config"]);
    let attempts = attempts.as_array().map(Vec::as_slice).unwrap_or_default();
    if attempts.is_empty() {
        return;
    }
    println!("\nUpdate attempts (newest first):");
    let rows: Vec<Vec<String>> = attempts
        .iter()
        .take(10)
        .map(|a| {
            vec![
                field(a, "release"),
                field(a, "attempt"),
                field(a, "state"),
                table::ago(a["updated_at"].as_i64(), now),
                field(a, "message"),
            ]
        })
        .collect();
    print!(
        "{}",
        table::render(&["RELEASE", "TRY", "STATE", "WHEN", "MESSAGE"], &rows)
    );
    if let Some(last_failed) = attempts
        .iter()
        .find(|a| a["state"] != "success" && !a["output"].is_null())
    {
        println!(
            "\nOutput of the last failed attempt ({} #{}):",
            field(last_failed, "release"),
            field(last_failed, "attempt")
        );
        println!("{}", last_failed["output"].as_str().unwrap_or(""));
    }
}
