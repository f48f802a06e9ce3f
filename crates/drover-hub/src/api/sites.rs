//! Management API: sites (where devices are installed, and for which customer).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use drover_protocol::validate;
use serde::Deserialize;

use crate::error::{ApiError, ApiJson, ApiQuery};
use crate::state::{HubState, Operator};
use crate::store::{Site, SitePatch};

/// `POST /api/v1/sites` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateSite {
    /// Unique name.
    pub name: String,
    /// Street address.
    #[serde(default)]
    pub address: String,
    /// Customer name or number.
    #[serde(default)]
    pub customer: String,
    /// When energy reporting started (Unix ms).
    #[serde(default)]
    pub reporting_start: Option<i64>,
}

/// `PATCH /api/v1/sites/{site}` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateSite {
    /// Street address.
    #[serde(default)]
    pub address: Option<String>,
    /// Customer.
    #[serde(default)]
    pub customer: Option<String>,
    /// Reporting start (Unix ms); `0` clears it.
    #[serde(default)]
    pub reporting_start: Option<i64>,
}

/// Query of `GET /api/v1/sites`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Only this customer's sites.
    #[serde(default)]
    pub customer: Option<String>,
}

fn check_text(what: &str, text: &str) -> Result<(), ApiError> {
    if text.len() > 256 || text.chars().any(char::is_control) {
        return Err(ApiError::bad_request(
            "invalid_site",
            format!("{what} is limited to 256 bytes without control characters"),
        ));
    }
    Ok(())
}

/// The site of an operator's organization with a name.
pub(crate) async fn site_named(
    hub: &HubState,
    op: &Operator,
    name: &str,
) -> Result<Site, ApiError> {
    hub.store
        .site_by_name(op.org_id, name)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("site {name:?}")))
}

/// `GET /api/v1/sites`.
pub async fn list(
    State(hub): State<HubState>,
    op: Operator,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> Result<axum::Json<Vec<Site>>, ApiError> {
    Ok(axum::Json(
        hub.store
            .list_sites(op.org_id, query.customer.as_deref())
            .await?,
    ))
}

/// `POST /api/v1/sites`.
pub async fn create(
    State(hub): State<HubState>,
    op: Operator,
    ApiJson(body): ApiJson<CreateSite>,
) -> Result<(StatusCode, axum::Json<Site>), ApiError> {
    validate::fleet_name(&body.name).map_err(|e| {
        ApiError::bad_request(
            "invalid_name",
            e.to_string().replace("a fleet name", "a site name"),
        )
    })?;
    check_text("address", &body.address)?;
    check_text("customer", &body.customer)?;
    let site = hub
        .store
        .create_site(
            op.org_id,
            &body.name,
            &body.address,
            &body.customer,
            body.reporting_start,
        )
        .await?;
    Ok((StatusCode::CREATED, axum::Json(site)))
}

/// `GET /api/v1/sites/{site}`.
pub async fn show(
    State(hub): State<HubState>,
    op: Operator,
    Path(name): Path<String>,
) -> Result<axum::Json<Site>, ApiError> {
    Ok(axum::Json(site_named(&hub, &op, &name).await?))
}

/// `PATCH /api/v1/sites/{site}`.
pub async fn update(
    State(hub): State<HubState>,
    op: Operator,
    Path(name): Path<String>,
    ApiJson(body): ApiJson<UpdateSite>,
) -> Result<axum::Json<Site>, ApiError> {
    let site = site_named(&hub, &op, &name).await?;
    if let Some(address) = &body.address {
        check_text("address", address)?;
    }
    if let Some(customer) = &body.customer {
        check_text("customer", customer)?;
    }
    let patch = SitePatch {
        address: body.address,
        customer: body.customer,
        reporting_start: body
            .reporting_start
            .map(|ms| if ms == 0 { None } else { Some(ms) }),
    };
    Ok(axum::Json(
        hub.store.update_site(op.org_id, &site, &patch).await?,
    ))
}
