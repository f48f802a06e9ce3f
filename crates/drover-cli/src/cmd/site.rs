//! `drover site`: where devices are installed and for which customer.

use std::process::ExitCode;

use clap::Subcommand;
use serde_json::{Value, json};

use super::field;
use crate::Ctx;
use crate::table;

/// `drover site ...`.
#[derive(Debug, Subcommand)]
pub enum SiteCommand {
    /// Create a site.
    Create {
        /// The site's name (letters, digits, '-', '_', '.').
        name: String,
        /// Street address.
        #[arg(long, default_value = "")]
        address: String,
        /// Customer name or number.
        #[arg(long, default_value = "")]
        customer: String,
        /// When energy reporting started (YYYY-MM-DD, UTC).
        #[arg(long)]
        reporting_start: Option<String>,
    },
    /// List sites.
    List {
        /// Only this customer's sites.
        #[arg(long)]
        customer: Option<String>,
    },
    /// Show a site and the devices installed there.
    Show {
        /// The site.
        name: String,
    },
    /// Change a site.
    Set {
        /// The site.
        name: String,
        /// Street address.
        #[arg(long)]
        address: Option<String>,
        /// Customer.
        #[arg(long)]
        customer: Option<String>,
        /// When energy reporting started (YYYY-MM-DD, UTC; "none" clears it).
        #[arg(long)]
        reporting_start: Option<String>,
    },
}

/// A `YYYY-MM-DD` date (UTC midnight) as Unix milliseconds.
pub fn parse_date(text: &str) -> anyhow::Result<i64> {
    let format = time::macros::format_description!("[year]-[month]-[day]");
    let date = time::Date::parse(text, &format)
        .map_err(|_| anyhow::anyhow!("dates are YYYY-MM-DD, such as 2026-01-31 (got {text:?})"))?;
    Ok(date.midnight().assume_utc().unix_timestamp() * 1000)
}

/// Unix milliseconds as a `YYYY-MM-DD HH:MM` UTC string.
pub fn format_time(ms: i64) -> String {
    let format = time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]");
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&format).ok())
        .unwrap_or_else(|| ms.to_string())
}

/// Runs `drover site ...`.
pub async fn run(ctx: &Ctx, command: SiteCommand) -> anyhow::Result<ExitCode> {
    let client = ctx.client()?;
    let value: Value = match command {
        SiteCommand::Create {
            name,
            address,
            customer,
            reporting_start,
        } => {
            let start = reporting_start.as_deref().map(parse_date).transpose()?;
            client
                .post(
                    "/api/v1/sites",
                    &json!({"name": name, "address": address, "customer": customer, "reporting_start": start}),
                )
                .await?
        }
        SiteCommand::List { customer } => {
            let path = match customer {
                Some(c) => format!("/api/v1/sites?customer={c}"),
                None => "/api/v1/sites".into(),
            };
            let sites: Value = client.get(&path).await?;
            if ctx.json() {
                return ctx.print_json(&sites).map(|()| ExitCode::SUCCESS);
            }
            let rows: Vec<Vec<String>> = sites
                .as_array()
                .into_iter()
                .flatten()
                .map(|s| {
                    vec![
                        field(s, "name"),
                        field(s, "customer"),
                        field(s, "address"),
                        s["reporting_start"]
                            .as_i64()
                            .map_or_else(|| "-".into(), format_time),
                    ]
                })
                .collect();
            print!(
                "{}",
                table::render(&["SITE", "CUSTOMER", "ADDRESS", "REPORTING SINCE"], &rows)
            );
            return Ok(ExitCode::SUCCESS);
        }
        SiteCommand::Show { name } => client.get(&format!("/api/v1/sites/{name}")).await?,
        SiteCommand::Set {
            name,
            address,
            customer,
            reporting_start,
        } => {
            let start = match reporting_start.as_deref() {
                None => None,
                Some("none") => Some(0),
                Some(date) => Some(parse_date(date)?),
            };
            client
                .patch(
                    &format!("/api/v1/sites/{name}"),
                    &json!({"address": address, "customer": customer, "reporting_start": start}),
                )
                .await?
        }
    };
    if ctx.json() {
        ctx.print_json(&value)?;
    } else {
        println!("Site:      {}", field(&value, "name"));
        println!("Customer:  {}", field(&value, "customer"));
        println!("Address:   {}", field(&value, "address"));
        println!(
            "Reporting: {}",
            value["reporting_start"]
                .as_i64()
                .map_or_else(|| "-".into(), |ms| format!("since {}", format_time(ms)))
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_parse_to_utc_midnight() {
        assert_eq!(parse_date("1970-01-02").unwrap(), 86_400_000);
        assert!(parse_date("2026-13-01").is_err());
        assert_eq!(format_time(86_400_000), "1970-01-02 00:00");
    }
}
