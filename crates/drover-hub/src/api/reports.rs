//! Management API: energy reports — create, show, freeze (immutable, with a content hash),
//! export as CSV.

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use drover_protocol::ids::sha256_hex;
use serde::{Deserialize, Serialize};

use super::series::parse_time;
use super::sites::site_named;
use crate::error::{ApiError, ApiJson, ApiPath};
use crate::state::{HubState, Operator};
use crate::store::{ReportRow, now_ms};
use crate::telemetry::report::{ReportContent, Scope, compute, to_csv};

/// `POST /api/v1/reports` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateReport {
    /// `meter`, `site` or `customer`.
    pub scope: String,
    /// `device/meter`, a site name, or a customer.
    pub subject: String,
    /// A calendar month (UTC), `YYYY-MM`.
    #[serde(default)]
    pub month: Option<String>,
    /// Period start: Unix ms or RFC 3339.
    #[serde(default)]
    pub from: Option<String>,
    /// Period end (exclusive; default now).
    #[serde(default)]
    pub to: Option<String>,
    /// From each site's reporting start date (site and customer scopes).
    #[serde(default)]
    pub since_start: bool,
}

/// A report as the API shows it.
#[derive(Debug, Serialize)]
pub struct ReportView {
    /// The stored definition.
    #[serde(flatten)]
    pub row: ReportRow,
    /// Whether it is frozen.
    pub frozen: bool,
    /// For a frozen report: whether the stored content still hashes to its `sha256`.
    pub verified: Option<bool>,
    /// The content: computed now for a draft, as frozen otherwise.
    pub content: ReportContent,
}

/// The first and last instants of a `YYYY-MM` month (UTC), in Unix ms.
pub fn month_bounds(text: &str) -> Option<(i64, i64)> {
    let (year, month) = text.split_once('-')?;
    let year: i32 = year.parse().ok()?;
    let month: u8 = month.parse().ok()?;
    let month = time::Month::try_from(month).ok()?;
    let start = time::Date::from_calendar_date(year, month, 1).ok()?;
    let next = if month == time::Month::December {
        time::Date::from_calendar_date(year + 1, time::Month::January, 1).ok()?
    } else {
        time::Date::from_calendar_date(year, month.next(), 1).ok()?
    };
    let ms = |d: time::Date| d.midnight().assume_utc().unix_timestamp() * 1000;
    Some((ms(start), ms(next)))
}

async fn scope_of(
    hub: &HubState,
    op: &Operator,
    scope: &str,
    subject: &str,
) -> Result<Scope, ApiError> {
    match scope {
        "meter" => {
            let (device, meter) = subject.split_once('/').ok_or_else(|| {
                ApiError::bad_request(
                    "invalid_subject",
                    "a meter report's subject is DEVICE/METER, such as k3x9tmq2ab/modbus-12345678",
                )
            })?;
            Ok(Scope::Meter {
                device: device.to_string(),
                meter: meter.to_string(),
            })
        }
        "site" => Ok(Scope::Site(site_named(hub, op, subject).await?)),
        "customer" => {
            let sites = hub.store.list_sites(op.org_id, Some(subject)).await?;
            if sites.is_empty() {
                return Err(ApiError::not_found(format!(
                    "a site of customer {subject:?}"
                )));
            }
            Ok(Scope::Customer(subject.to_string(), sites))
        }
        other => Err(ApiError::bad_request(
            "invalid_scope",
            format!("scope is meter, site or customer, not {other:?}"),
        )),
    }
}

/// `POST /api/v1/reports`.
pub async fn create(
    State(hub): State<HubState>,
    op: Operator,
    ApiJson(body): ApiJson<CreateReport>,
) -> Result<(StatusCode, axum::Json<ReportView>), ApiError> {
    // A report covers every batch acknowledged before it was asked for.
    hub.folder.settle().await?;
    let scope = scope_of(&hub, &op, &body.scope, &body.subject).await?;
    let (from, to) = match (&body.month, &body.from, body.since_start) {
        (Some(month), None, false) => month_bounds(month).ok_or_else(|| {
            ApiError::bad_request("invalid_month", format!("month is YYYY-MM, not {month:?}"))
        })?,
        (None, Some(from), false) => {
            let to = body
                .to
                .as_deref()
                .map(parse_time)
                .transpose()?
                .unwrap_or_else(now_ms);
            (parse_time(from)?, to)
        }
        (None, None, true) => {
            let starts: Vec<Option<i64>> = match &scope {
                Scope::Site(site) => vec![site.reporting_start],
                Scope::Customer(_, sites) => sites.iter().map(|s| s.reporting_start).collect(),
                Scope::Meter { .. } => vec![None],
            };
            let earliest = starts.iter().flatten().min().copied();
            let (Some(earliest), false) = (earliest, starts.iter().any(Option::is_none)) else {
                return Err(ApiError::bad_request(
                    "no_reporting_start",
                    "since_start needs a site (or customer) whose sites all have a reporting start date ('drover site set NAME --reporting-start YYYY-MM-DD')",
                ));
            };
            let to = body
                .to
                .as_deref()
                .map(parse_time)
                .transpose()?
                .unwrap_or_else(now_ms);
            (earliest, to)
        }
        _ => {
            return Err(ApiError::bad_request(
                "invalid_period",
                "give exactly one of: month (YYYY-MM), from (with an optional to), since_start",
            ));
        }
    };
    if from >= to {
        return Err(ApiError::bad_request(
            "invalid_period",
            "the period is empty",
        ));
    }
    let subject = scope.subject();
    // A since-start report keeps that meaning: its period's start is each site's own.
    let stored_scope = if body.since_start {
        format!("{}:since_start", scope.kind())
    } else {
        scope.kind().to_string()
    };
    let row = hub
        .store
        .create_report(op.org_id, &stored_scope, &subject, from, to)
        .await?;
    let content = compute(&hub.store, op.org_id, &scope, from, to, body.since_start).await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(ReportView {
            row,
            frozen: false,
            verified: None,
            content,
        }),
    ))
}

/// `GET /api/v1/reports`.
pub async fn list(
    State(hub): State<HubState>,
    op: Operator,
) -> Result<axum::Json<Vec<ReportRow>>, ApiError> {
    Ok(axum::Json(hub.store.list_reports(op.org_id).await?))
}

async fn view(hub: &HubState, op: &Operator, id: i64) -> Result<ReportView, ApiError> {
    let row = hub
        .store
        .report(op.org_id, id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("report {id}")))?;
    if let (Some(content), Some(hash)) = (&row.content, &row.sha256) {
        let verified = sha256_hex(content.as_bytes()) == *hash;
        let content: ReportContent = serde_json::from_str(content).map_err(ApiError::internal)?;
        return Ok(ReportView {
            frozen: true,
            verified: Some(verified),
            content,
            row,
        });
    }
    let content = current(hub, op, &row).await?;
    Ok(ReportView {
        frozen: false,
        verified: None,
        content,
        row,
    })
}

async fn current(
    hub: &HubState,
    op: &Operator,
    row: &ReportRow,
) -> Result<ReportContent, ApiError> {
    let (kind, since_start) = match row.scope.split_once(':') {
        Some((kind, _)) => (kind, true),
        None => (row.scope.as_str(), false),
    };
    let scope = scope_of(hub, op, kind, &row.subject).await?;
    // A draft (and what a freeze stores) covers every batch acknowledged before it was asked
    // for.
    hub.folder.settle().await?;
    Ok(compute(&hub.store, op.org_id, &scope, row.from, row.to, since_start).await?)
}

/// `GET /api/v1/reports/{id}`.
pub async fn show(
    State(hub): State<HubState>,
    op: Operator,
    ApiPath(id): ApiPath<i64>,
) -> Result<axum::Json<ReportView>, ApiError> {
    Ok(axum::Json(view(&hub, &op, id).await?))
}

/// `POST /api/v1/reports/{id}/freeze`: computes the content one last time and stores it with
/// its SHA-256; from then on the report never changes.
pub async fn freeze(
    State(hub): State<HubState>,
    op: Operator,
    ApiPath(id): ApiPath<i64>,
) -> Result<axum::Json<ReportView>, ApiError> {
    let existing = view(&hub, &op, id).await?;
    if existing.frozen {
        return Err(ApiError::conflict(format!(
            "report {id} was frozen already; a frozen report never changes (make a new one)"
        )));
    }
    let text = String::from_utf8(existing.content.canonical()).map_err(ApiError::internal)?;
    let hash = sha256_hex(text.as_bytes());
    if !hub.store.freeze_report(op.org_id, id, &text, &hash).await? {
        return Err(ApiError::conflict(format!(
            "report {id} was frozen already"
        )));
    }
    tracing::info!(report = id, sha256 = %hash, "report frozen");
    Ok(axum::Json(view(&hub, &op, id).await?))
}

/// `GET /api/v1/reports/{id}/csv`.
pub async fn csv(
    State(hub): State<HubState>,
    op: Operator,
    ApiPath(id): ApiPath<i64>,
) -> Result<impl IntoResponse, ApiError> {
    let report = view(&hub, &op, id).await?;
    Ok((
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"drover-report-{id}.csv\""),
            ),
        ],
        to_csv(&report.content, id, report.row.sha256.as_deref()),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn months_are_utc_calendar_months() {
        let (from, to) = month_bounds("2026-02").unwrap();
        assert_eq!(to - from, 28 * 86_400_000);
        let (from, to) = month_bounds("2026-12").unwrap();
        assert_eq!(to - from, 31 * 86_400_000);
        assert!(month_bounds("2026-13").is_none());
        assert!(month_bounds("February").is_none());
    }
}
