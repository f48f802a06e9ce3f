//! `drover series`, `drover query` and `drover report`: the data cloud from the command line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Subcommand, ValueEnum};
use serde_json::{Value, json};

use super::field;
use super::site::{format_time, parse_date};
use crate::Ctx;
use crate::table;

/// `drover series ...`.
#[derive(Debug, Subcommand)]
pub enum SeriesCommand {
    /// List series (one channel of one meter of one device).
    List(SeriesFilter),
    /// Show where a cumulative register went backwards (a reset, a rollover or a small step
    /// back), as flagged when the readings arrived.
    Flags {
        /// The series ID (from `drover series list`).
        id: i64,
        /// Start: YYYY-MM-DD, RFC 3339, or Unix ms (default: the beginning).
        #[arg(long)]
        from: Option<String>,
        /// End, exclusive (default: no end).
        #[arg(long)]
        to: Option<String>,
    },
}

/// Filters shared by `series list` and `query`.
#[derive(Debug, Args)]
pub struct SeriesFilter {
    /// Only devices at this site.
    #[arg(long)]
    site: Option<String>,
    /// Only this device.
    #[arg(long)]
    device: Option<String>,
    /// Only devices of this type.
    #[arg(long)]
    device_type: Option<String>,
    /// Only this meter.
    #[arg(long)]
    meter: Option<String>,
    /// Only this channel (energy_import, power, voltage_l1, ...).
    #[arg(long)]
    channel: Option<String>,
    /// Only devices reporting this tag.
    #[arg(long)]
    tag: Option<String>,
}

impl SeriesFilter {
    fn query(&self) -> String {
        let pairs = [
            ("site", &self.site),
            ("device", &self.device),
            ("device_type", &self.device_type),
            ("meter", &self.meter),
            ("channel", &self.channel),
            ("tag", &self.tag),
        ];
        let parts: Vec<String> = pairs
            .iter()
            .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={}", encode(v))))
            .collect();
        if parts.is_empty() {
            String::new()
        } else {
            format!("?{}", parts.join("&"))
        }
    }
}

/// Percent-encodes a query value (the few characters names may hold that URLs do not like).
fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                char::from(b).to_string()
            }
            other => format!("%{other:02X}"),
        })
        .collect()
}

/// Output formats for `drover query`.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Format {
    /// A table.
    Table,
    /// CSV.
    Csv,
    /// JSON.
    Json,
}

/// `drover query`.
#[derive(Debug, Args)]
pub struct QueryArgs {
    /// The series ID (from `drover series list`); or use the filters to pick exactly one.
    series: Option<i64>,
    #[command(flatten)]
    filter: SeriesFilter,
    /// Start: YYYY-MM-DD, RFC 3339, or Unix ms (default: 24 hours before --to).
    #[arg(long)]
    from: Option<String>,
    /// End, exclusive (default: now).
    #[arg(long)]
    to: Option<String>,
    /// raw, 1m, 1h or 1d.
    #[arg(long, default_value = "raw")]
    resolution: String,
    /// With a rollup: avg, sum, min, max, last, count, or energy (register increase).
    #[arg(long)]
    agg: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
}

/// `drover report ...`.
#[derive(Debug, Subcommand)]
pub enum ReportCommand {
    /// Make an energy report for a meter (DEVICE/METER), a site or a customer.
    Create {
        /// meter, site or customer.
        #[arg(long)]
        scope: String,
        /// DEVICE/METER, a site name, or a customer.
        #[arg(long)]
        subject: String,
        /// A calendar month, YYYY-MM (UTC).
        #[arg(long, conflicts_with_all = ["from", "since_start"])]
        month: Option<String>,
        /// Start (YYYY-MM-DD, RFC 3339 or Unix ms).
        #[arg(long, conflicts_with = "since_start")]
        from: Option<String>,
        /// End, exclusive (default now).
        #[arg(long)]
        to: Option<String>,
        /// From each site's reporting start date.
        #[arg(long)]
        since_start: bool,
    },
    /// List reports.
    List,
    /// Show a report (a draft is recomputed; a frozen one is shown as frozen, hash checked).
    Show {
        /// The report's ID.
        id: i64,
    },
    /// Freeze a report: its content is stored with a SHA-256 and never changes again.
    Freeze {
        /// The report's ID.
        id: i64,
    },
    /// Export a report as CSV (or JSON).
    Export {
        /// The report's ID.
        id: i64,
        /// Write to this file instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
        /// csv or json.
        #[arg(long, value_enum, default_value_t = ExportFormat::Csv)]
        format: ExportFormat,
    },
}

/// Formats for `drover report export`.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ExportFormat {
    /// CSV: the meters, the total, then every gap, flag and replacement.
    Csv,
    /// The report as the API gives it.
    Json,
}

/// A time argument: a date, RFC 3339, or Unix ms, as the hub's API takes it.
pub fn time_arg(text: &str) -> anyhow::Result<String> {
    if text.len() == 10 && text.as_bytes()[4] == b'-' {
        return Ok(parse_date(text)?.to_string());
    }
    Ok(text.to_string())
}

/// Runs `drover series ...`.
pub async fn series(ctx: &Ctx, command: SeriesCommand) -> anyhow::Result<ExitCode> {
    let client = ctx.client()?;
    let filter = match command {
        SeriesCommand::List(filter) => filter,
        SeriesCommand::Flags { id, from, to } => return flags(ctx, id, from, to).await,
    };
    let series: Value = client
        .get(&format!("/api/v1/series{}", filter.query()))
        .await?;
    if ctx.json() {
        return ctx.print_json(&series).map(|()| ExitCode::SUCCESS);
    }
    let now = table::now_ms();
    let rows: Vec<Vec<String>> = series
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| {
            vec![
                field(s, "id"),
                field(s, "device"),
                field(s, "meter"),
                field(s, "channel"),
                format!(
                    "{} {}",
                    field(s, "last_value"),
                    s["unit"].as_str().unwrap_or("")
                ),
                field(s, "points"),
                table::ago(s["last_ts"].as_i64(), now),
            ]
        })
        .collect();
    print!(
        "{}",
        table::render(
            &[
                "ID", "DEVICE", "METER", "CHANNEL", "LAST", "POINTS", "UPDATED"
            ],
            &rows
        )
    );
    Ok(ExitCode::SUCCESS)
}

/// Runs `drover series flags`.
async fn flags(
    ctx: &Ctx,
    id: i64,
    from: Option<String>,
    to: Option<String>,
) -> anyhow::Result<ExitCode> {
    let client = ctx.client()?;
    let mut params = Vec::new();
    if let Some(from) = &from {
        params.push(format!("from={}", encode(&time_arg(from)?)));
    }
    if let Some(to) = &to {
        params.push(format!("to={}", encode(&time_arg(to)?)));
    }
    let flags: Value = client
        .get(&format!("/api/v1/series/{id}/flags?{}", params.join("&")))
        .await?;
    if ctx.json() {
        return ctx.print_json(&flags).map(|()| ExitCode::SUCCESS);
    }
    let rows: Vec<Vec<String>> = flags
        .as_array()
        .into_iter()
        .flatten()
        .map(|f| {
            vec![
                field(f, "kind"),
                f["from_ts"]
                    .as_i64()
                    .map_or_else(|| "-".into(), format_time),
                f["to_ts"].as_i64().map_or_else(|| "-".into(), format_time),
                field(f, "from_value"),
                field(f, "to_value"),
                field(f, "counted"),
            ]
        })
        .collect();
    if rows.is_empty() {
        println!("No flags: the register never went backwards.");
        return Ok(ExitCode::SUCCESS);
    }
    print!(
        "{}",
        table::render(
            &[
                "KIND",
                "BEFORE (UTC)",
                "AFTER (UTC)",
                "FROM",
                "TO",
                "COUNTED"
            ],
            &rows
        )
    );
    Ok(ExitCode::SUCCESS)
}

/// Runs `drover query`.
pub async fn query(ctx: &Ctx, args: QueryArgs) -> anyhow::Result<ExitCode> {
    let client = ctx.client()?;
    let id = match args.series {
        Some(id) => id,
        None => {
            let found: Value = client
                .get(&format!("/api/v1/series{}", args.filter.query()))
                .await?;
            match found.as_array().map(Vec::as_slice).unwrap_or_default() {
                [one] => one["id"].as_i64().context("series without an ID")?,
                [] => anyhow::bail!("no series matches; see 'drover series list'"),
                many => anyhow::bail!(
                    "{} series match; give a series ID or narrow the filters (--device, --meter, --channel)",
                    many.len()
                ),
            }
        }
    };
    let mut params = vec![format!("resolution={}", encode(&args.resolution))];
    if let Some(from) = &args.from {
        params.push(format!("from={}", encode(&time_arg(from)?)));
    }
    if let Some(to) = &args.to {
        params.push(format!("to={}", encode(&time_arg(to)?)));
    }
    if let Some(agg) = &args.agg {
        params.push(format!("agg={}", encode(agg)));
    }
    let data: Value = client
        .get(&format!("/api/v1/series/{id}/data?{}", params.join("&")))
        .await?;
    let points = data["points"].as_array().cloned().unwrap_or_default();
    let unit = if args.agg.as_deref() == Some("count") {
        String::new()
    } else {
        data["series"]["unit"].as_str().unwrap_or("").to_string()
    };
    match (args.format, ctx.json()) {
        (Format::Json, _) | (_, true) => ctx.print_json(&data)?,
        (Format::Csv, false) => {
            println!("time_ms,time,value");
            for p in &points {
                let ts = p[0].as_i64().unwrap_or(0);
                println!("{ts},{},{}", format_time(ts), p[1]);
            }
        }
        (Format::Table, false) => {
            let rows: Vec<Vec<String>> = points
                .iter()
                .map(|p| {
                    let ts = p[0].as_i64().unwrap_or(0);
                    vec![format_time(ts), format!("{} {unit}", p[1])]
                })
                .collect();
            print!("{}", table::render(&["TIME (UTC)", "VALUE"], &rows));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs `drover report ...`.
pub async fn report(ctx: &Ctx, command: ReportCommand) -> anyhow::Result<ExitCode> {
    let client = ctx.client()?;
    match command {
        ReportCommand::Create {
            scope,
            subject,
            month,
            from,
            to,
            since_start,
        } => {
            let body = json!({
                "scope": scope,
                "subject": subject,
                "month": month,
                "from": from.as_deref().map(time_arg).transpose()?,
                "to": to.as_deref().map(time_arg).transpose()?,
                "since_start": since_start,
            });
            let report: Value = client.post("/api/v1/reports", &body).await?;
            print_report(ctx, &report)?;
        }
        ReportCommand::List => {
            let reports: Value = client.get("/api/v1/reports").await?;
            if ctx.json() {
                return ctx.print_json(&reports).map(|()| ExitCode::SUCCESS);
            }
            let rows: Vec<Vec<String>> = reports
                .as_array()
                .into_iter()
                .flatten()
                .map(|r| {
                    vec![
                        field(r, "id"),
                        field(r, "scope"),
                        field(r, "subject"),
                        r["from"].as_i64().map_or_else(|| "-".into(), format_time),
                        r["to"].as_i64().map_or_else(|| "-".into(), format_time),
                        r["frozen_at"]
                            .as_i64()
                            .map_or_else(|| "draft".into(), format_time),
                    ]
                })
                .collect();
            print!(
                "{}",
                table::render(&["ID", "SCOPE", "SUBJECT", "FROM", "TO", "FROZEN"], &rows)
            );
        }
        ReportCommand::Show { id } => {
            let report: Value = client.get(&format!("/api/v1/reports/{id}")).await?;
            print_report(ctx, &report)?;
        }
        ReportCommand::Freeze { id } => {
            let report: Value = client
                .post(&format!("/api/v1/reports/{id}/freeze"), &json!({}))
                .await?;
            print_report(ctx, &report)?;
        }
        ReportCommand::Export { id, out, format } => {
            let text = match format {
                ExportFormat::Json => {
                    let report: Value = client.get(&format!("/api/v1/reports/{id}")).await?;
                    serde_json::to_string_pretty(&report)?
                }
                ExportFormat::Csv => {
                    client
                        .get_text(&format!("/api/v1/reports/{id}/csv"))
                        .await?
                }
            };
            match out {
                Some(path) => {
                    std::fs::write(&path, text)
                        .with_context(|| format!("writing {}", path.display()))?;
                    eprintln!("Wrote report {id} to {}", path.display());
                }
                None => print!("{text}"),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// An `energy_wh` field as the shortest decimal that is exact (897, 123.45).
fn wh(value: &Value) -> String {
    value["energy_wh"]
        .as_f64()
        .map_or_else(|| "-".into(), |wh| wh.to_string())
}

fn print_report(ctx: &Ctx, report: &Value) -> anyhow::Result<()> {
    if ctx.json() {
        return ctx.print_json(report);
    }
    let c = &report["content"];
    println!(
        "Report {}: {} {}",
        field(report, "id"),
        field(c, "scope"),
        field(c, "subject")
    );
    println!(
        "Period:       {} to {} (UTC, end exclusive)",
        c["from"].as_i64().map_or_else(|| "-".into(), format_time),
        c["to"].as_i64().map_or_else(|| "-".into(), format_time)
    );
    println!("Energy:       {} Wh", wh(c));
    println!(
        "Completeness: {:.2} %",
        c["completeness_pct"].as_f64().unwrap_or(0.0)
    );
    if report["frozen"] == true {
        let verified = if report["verified"] == true {
            "verified"
        } else {
            "HASH MISMATCH"
        };
        println!(
            "Frozen:       {} (sha256 {}, {verified})",
            report["frozen_at"]
                .as_i64()
                .map_or_else(|| "-".into(), format_time),
            field(report, "sha256")
        );
    } else {
        println!(
            "Frozen:       no (a draft: recomputed each time; 'drover report freeze' fixes it)"
        );
    }
    let rows: Vec<Vec<String>> = c["meters"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| {
            vec![
                field(m, "device"),
                field(m, "meter"),
                field(m, "site"),
                wh(m),
                format!("{:.2}", m["completeness_pct"].as_f64().unwrap_or(0.0)),
                m["gaps"].as_array().map_or(0, Vec::len).to_string(),
                m["flags"].as_array().map_or(0, Vec::len).to_string(),
            ]
        })
        .collect();
    print!(
        "\n{}",
        table::render(
            &[
                "DEVICE",
                "METER",
                "SITE",
                "WH",
                "COMPLETE %",
                "GAPS",
                "FLAGS"
            ],
            &rows
        )
    );
    for r in c["replacements"].as_array().into_iter().flatten() {
        println!(
            "Replacement: on {} meter {} was replaced by {} ({})",
            field(r, "device"),
            field(r, "old_meter"),
            field(r, "new_meter"),
            r["new_first"]
                .as_i64()
                .map_or_else(|| "-".into(), format_time)
        );
    }
    Ok(())
}
