//! `drover login`: checks a hub URL and token, then saves them for later commands.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use clap::Args;

use crate::Ctx;
use crate::client::HubClient;
use crate::profile::Profile;

/// `drover login`.
#[derive(Debug, Args)]
pub struct LoginArgs {
    /// Read the token from this file (such as the hub's <data-dir>/admin-token) instead of
    /// --token, so that it stays out of the shell history.
    #[arg(long)]
    token_file: Option<PathBuf>,
}

/// Runs `drover login`.
pub async fn run(ctx: &Ctx, args: LoginArgs) -> anyhow::Result<ExitCode> {
    let Some(hub) = ctx.hub.clone() else {
        bail!("give the hub's URL: drover login --hub https://hub.example.com --token TOKEN");
    };
    let token = match (&args.token_file, &ctx.token) {
        (Some(path), _) => std::fs::read_to_string(path)
            .with_context(|| format!("reading the token from {}", path.display()))?
            .trim()
            .to_string(),
        (None, Some(token)) => token.clone(),
        (None, None) => bail!("give a token with --token or --token-file"),
    };
    let ca = match &ctx.ca {
        Some(ca) => {
            Some(std::fs::canonicalize(ca).with_context(|| format!("finding {}", ca.display()))?)
        }
        None => None,
    };
    let client = HubClient::new(&hub, &token, ca.as_deref())?;
    let who: serde_json::Value = client.get("/api/v1/whoami").await?;
    let profile = Profile {
        hub_url: Some(hub.clone()),
        token: Some(token),
        ca_file: ca,
    };
    profile.save(&ctx.cli_config)?;
    if ctx.json() {
        ctx.print_json(&who)?;
    } else {
        println!(
            "Logged in to {hub} as {} (organization {}); saved to {}",
            super::field(&who, "token"),
            super::field(&who, "organization"),
            ctx.cli_config.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}
