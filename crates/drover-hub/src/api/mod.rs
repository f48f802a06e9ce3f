//! The hub's HTTP surface: one router for the device API (`/device/v1`), the management API
//! (`/api/v1`), the seed protocol (`/seed/{secret}`) and the OpenAPI document.

mod device;
mod devices;
mod download;
mod fleets;
mod releases;
mod reports;
mod seed;
mod series;
mod sites;
mod telemetry;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post, put};
use serde::Serialize;
use tower_http::trace::TraceLayer;

use crate::error::ApiError;
use crate::state::{HubState, Operator};

pub use download::{ByteRange, RangeRequest, parse_range};
pub use seed::iso_time;

/// The OpenAPI document of the management and device APIs.
pub const OPENAPI_JSON: &str = include_str!("../../openapi.json");

/// The router, with its state.
pub fn router(hub: HubState) -> Router {
    let json_limit = hub.config.max_json_bytes;
    let device = Router::new()
        .route("/device/v1/enroll", post(device::enroll))
        .route("/device/v1/checkin", post(device::checkin))
        .route("/device/v1/reports", post(device::reports))
        .route("/device/v1/artifacts/{sha256}", get(device::artifact))
        .route("/device/v1/batches", post(telemetry::batches))
        .route("/device/v1/batches/stream", post(telemetry::stream));
    let manage = Router::new()
        .route("/api/v1/whoami", get(whoami))
        .route("/api/v1/fleets", get(fleets::list).post(fleets::create))
        .route(
            "/api/v1/fleets/{fleet}",
            get(fleets::show).patch(fleets::update),
        )
        .route(
            "/api/v1/fleets/{fleet}/provisioning-key",
            post(fleets::rotate_key),
        )
        .route("/api/v1/fleets/{fleet}/deploy", post(fleets::deploy))
        .route("/api/v1/fleets/{fleet}/status", get(fleets::status))
        .route(
            "/api/v1/fleets/{fleet}/releases",
            get(releases::list).post(releases::create),
        )
        .route(
            "/api/v1/fleets/{fleet}/releases/{version}",
            get(releases::show),
        )
        .route("/api/v1/devices", get(devices::list))
        .route("/api/v1/device-types", get(devices::device_types))
        .route("/api/v1/sites", get(sites::list).post(sites::create))
        .route("/api/v1/series", get(series::list))
        .route("/api/v1/series/{id}/data", get(series::data))
        .route("/api/v1/series/{id}/flags", get(series::flags))
        .route("/api/v1/live", get(series::live))
        .route("/api/v1/reports", get(reports::list).post(reports::create))
        .route("/api/v1/reports/{id}", get(reports::show))
        .route("/api/v1/reports/{id}/freeze", post(reports::freeze))
        .route("/api/v1/reports/{id}/csv", get(reports::csv))
        .route(
            "/api/v1/sites/{site}",
            get(sites::show).patch(sites::update),
        )
        .route(
            "/api/v1/devices/{id}",
            get(devices::show).patch(devices::update),
        )
        .route("/api/v1/devices/{id}/accept", post(devices::accept))
        .route("/api/v1/devices/{id}/revoke", post(devices::revoke))
        .route("/api/v1/devices/{id}/retry", post(devices::retry))
        .route("/api/v1/devices/{id}/attempts", get(devices::attempts));
    let seed = Router::new()
        .route("/seed/{secret}/updateme", get(seed::updateme))
        .route("/seed/{secret}/howitworkedout", post(seed::howitworkedout))
        .route("/seed/{secret}/time", get(seed::time))
        .route(
            "/seed/{secret}/modbusnotification",
            post(seed::modbusnotification),
        )
        .route(
            "/seed/{secret}/energynotification",
            post(seed::energynotification),
        )
        .route("/seed/{secret}/artifacts/{sha256}", get(seed::artifact));
    // Artifact uploads stream to disk under their own limit (max_artifact_bytes), so the JSON
    // body limit must not apply to them.
    let uploads = Router::new()
        .route(
            "/api/v1/artifacts/{sha256}",
            put(releases::upload_artifact).get(releases::artifact_info),
        )
        .layer(DefaultBodyLimit::disable());
    Router::new()
        .merge(device)
        .merge(manage)
        .merge(seed)
        .layer(DefaultBodyLimit::max(json_limit))
        .merge(uploads)
        .route("/api/v1/openapi.json", get(openapi))
        .route("/healthz", get(healthz))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(TraceLayer::new_for_http())
        .with_state(hub)
}

async fn openapi() -> impl IntoResponse {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        OPENAPI_JSON,
    )
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "no_route",
        "no such endpoint; GET /api/v1/openapi.json lists them all",
    )
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this endpoint exists but not with this method; see /api/v1/openapi.json",
    )
}

/// Who a token acts as.
#[derive(Debug, Serialize)]
struct WhoAmI {
    organization: String,
    token: String,
    role: String,
}

async fn whoami(
    axum::extract::State(hub): axum::extract::State<HubState>,
    op: Operator,
) -> Result<axum::Json<WhoAmI>, ApiError> {
    let org = hub
        .store
        .list_orgs()
        .await?
        .into_iter()
        .find(|o| o.id == op.org_id)
        .ok_or_else(|| ApiError::internal("token without an organization"))?;
    Ok(axum::Json(WhoAmI {
        organization: org.name,
        token: op.token.name,
        role: op.token.role,
    }))
}
