//! `drover status`: how far each fleet has converged on its targets; `--watch` follows it live
//! with one progress bar per fleet.

use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use serde_json::Value;

use super::field;
use crate::Ctx;
use crate::client::HubClient;
use crate::table;

/// `drover status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Only this fleet.
    #[arg(long)]
    fleet: Option<String>,
    /// Keep refreshing until Ctrl-C.
    #[arg(long)]
    watch: bool,
    /// Seconds between refreshes with --watch.
    #[arg(long, default_value_t = 1.0)]
    interval: f64,
}

/// Runs `drover status`.
pub async fn run(ctx: &Ctx, args: StatusArgs) -> anyhow::Result<ExitCode> {
    let client = ctx.client()?;
    let fleets = match &args.fleet {
        Some(f) => vec![f.clone()],
        None => {
            let all: Value = client.get("/api/v1/fleets").await?;
            all.as_array()
                .into_iter()
                .flatten()
                .map(|f| field(f, "name"))
                .collect()
        }
    };
    if !args.watch {
        let mut statuses = Vec::new();
        for fleet in &fleets {
            statuses.push(fetch(&client, fleet).await?);
        }
        if ctx.json() {
            ctx.print_json(&Value::Array(statuses))?;
        } else {
            print!("{}", render(&statuses));
        }
        return Ok(ExitCode::SUCCESS);
    }
    let interval = Duration::from_secs_f64(args.interval.clamp(0.2, 3600.0));
    let watch = Watch::new(&fleets);
    tokio::select! {
        result = async {
            loop {
                watch.refresh(&client).await?;
                tokio::time::sleep(interval).await;
            }
            #[allow(unreachable_code, reason = "the loop only ends by error")]
            Ok::<(), anyhow::Error>(())
        } => result?,
        () = super::shutdown_signal() => {}
    }
    watch.finish();
    Ok(ExitCode::SUCCESS)
}

/// A fleet's status from the hub.
pub async fn fetch(client: &HubClient, fleet: &str) -> anyhow::Result<Value> {
    client.get(&format!("/api/v1/fleets/{fleet}/status")).await
}

fn render(statuses: &[Value]) -> String {
    let rows: Vec<Vec<String>> = statuses
        .iter()
        .map(|s| {
            vec![
                field(s, "fleet"),
                targets(s),
                format!("{}/{}", field(s, "up_to_date"), field(s, "accepted")),
                field(s, "updating"),
                field(s, "backing_off"),
                field(s, "held"),
                field(s, "pending"),
                format!("{}/{}", field(s, "online"), field(s, "accepted")),
                if s["converged"] == true { "yes" } else { "no" }.into(),
            ]
        })
        .collect();
    table::render(
        &[
            "FLEET",
            "TARGET",
            "UP TO DATE",
            "UPDATING",
            "BACKING OFF",
            "HELD",
            "PENDING",
            "ONLINE",
            "CONVERGED",
        ],
        &rows,
    )
}

fn targets(status: &Value) -> String {
    let list: Vec<String> = status["targets"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| match t["device_type"].as_str() {
            Some("*") | None => field(t, "release"),
            Some(device_type) => format!("{}={device_type}", field(t, "release")),
        })
        .collect();
    if list.is_empty() {
        "-".into()
    } else {
        list.join(",")
    }
}

/// Live progress bars, one per fleet: up to date out of accepted.
pub struct Watch {
    bars: Vec<(String, indicatif::ProgressBar)>,
    _multi: indicatif::MultiProgress,
}

impl Watch {
    /// Bars for these fleets.
    pub fn new(fleets: &[String]) -> Watch {
        let multi = indicatif::MultiProgress::new();
        let style = indicatif::ProgressStyle::with_template(
            "{prefix:>12} {bar:30.green/white} {pos:>5}/{len:<5} {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
        let bars = fleets
            .iter()
            .map(|fleet| {
                let bar = multi.add(indicatif::ProgressBar::new(0));
                bar.set_style(style.clone());
                bar.set_prefix(fleet.clone());
                (fleet.clone(), bar)
            })
            .collect();
        Watch {
            bars,
            _multi: multi,
        }
    }

    /// Fetches every fleet's status and redraws; returns the statuses.
    pub async fn refresh(&self, client: &HubClient) -> anyhow::Result<Vec<Value>> {
        let mut statuses = Vec::new();
        for (fleet, bar) in &self.bars {
            let s = fetch(client, fleet).await?;
            bar.set_length(s["accepted"].as_u64().unwrap_or(0));
            bar.set_position(s["up_to_date"].as_u64().unwrap_or(0));
            bar.set_message(format!(
                "target {} | updating {} | backing off {} | held {} | pending {} | online {}{}",
                targets(&s),
                field(&s, "updating"),
                field(&s, "backing_off"),
                field(&s, "held"),
                field(&s, "pending"),
                field(&s, "online"),
                if s["converged"] == true {
                    " | converged"
                } else {
                    ""
                }
            ));
            statuses.push(s);
        }
        Ok(statuses)
    }

    /// Leaves the bars on screen as they are.
    pub fn finish(&self) {
        for (_, bar) in &self.bars {
            bar.abandon();
        }
    }
}
