//! Management API: the time-series query surface — list series, read a range at raw or rollup
//! resolution, follow new points live (server-sent events, for 2-second charts).

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use drover_protocol::reading::Channel;
use futures_util::Stream;
use serde::{Deserialize, Serialize};

use super::sites::site_named;
use crate::error::{ApiError, ApiPath, ApiQuery};
use crate::state::{HubState, Operator};
use crate::store::{Series, SeriesFilter, now_ms, unscale};
use crate::telemetry::energy::Anomaly;
use crate::telemetry::rollup::{Bucket, Resolution, energy_per_bucket};

/// The most points one range query returns.
pub const MAX_POINTS: usize = 100_000;

/// Query of `GET /api/v1/series`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Only devices at this site.
    #[serde(default)]
    pub site: Option<String>,
    /// Only this device.
    #[serde(default)]
    pub device: Option<String>,
    /// Only devices of this type.
    #[serde(default)]
    pub device_type: Option<String>,
    /// Only this meter.
    #[serde(default)]
    pub meter: Option<String>,
    /// Only this channel (`energy_import`, `power`, ...).
    #[serde(default)]
    pub channel: Option<String>,
    /// Only devices reporting this tag.
    #[serde(default)]
    pub tag: Option<String>,
}

/// A series as the API shows it.
#[derive(Debug, Serialize)]
pub struct SeriesView {
    /// Its ID, for data queries.
    pub id: i64,
    /// The device.
    pub device: String,
    /// The meter.
    pub meter: String,
    /// The channel.
    pub channel: String,
    /// The unit of values.
    pub unit: String,
    /// First point (Unix ms).
    pub first_ts: Option<i64>,
    /// Last point.
    pub last_ts: Option<i64>,
    /// Last value, in the unit.
    pub last_value: Option<f64>,
    /// Points stored.
    pub points: i64,
}

impl From<Series> for SeriesView {
    fn from(s: Series) -> SeriesView {
        SeriesView {
            id: s.id,
            device: s.device,
            meter: s.meter,
            channel: s.channel,
            unit: s.unit,
            first_ts: s.first_ts,
            last_ts: s.last_ts,
            last_value: s.last_value.map(|v| unscale(i128::from(v), s.scale)),
            points: s.points,
        }
    }
}

/// `GET /api/v1/series`.
pub async fn list(
    State(hub): State<HubState>,
    op: Operator,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> Result<axum::Json<Vec<SeriesView>>, ApiError> {
    let site_id = match &query.site {
        Some(name) => Some(site_named(&hub, &op, name).await?.id),
        None => None,
    };
    if let Some(c) = &query.channel
        && Channel::parse(c).is_none()
    {
        return Err(ApiError::bad_request(
            "invalid_channel",
            format!("no channel is called {c:?} (energy_import, power, voltage_l1, ...)"),
        ));
    }
    let filter = SeriesFilter {
        site_id,
        device: query.device,
        device_type: query.device_type,
        meter: query.meter,
        channel: query.channel,
        tag: query.tag,
    };
    hub.folder.settle().await?;
    let series = hub.store.list_series(op.org_id, &filter).await?;
    Ok(axum::Json(series.into_iter().map(Into::into).collect()))
}

/// Query of `GET /api/v1/series/{id}/data`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataQuery {
    /// Start: Unix ms or RFC 3339 (default: 24 hours before `to`); with a rollup resolution,
    /// the bucket holding it is included whole.
    #[serde(default)]
    pub from: Option<String>,
    /// End, exclusive: Unix ms or RFC 3339 (default: now).
    #[serde(default)]
    pub to: Option<String>,
    /// `raw`, `1m`, `1h` or `1d` (default `raw`).
    #[serde(default)]
    pub resolution: Option<String>,
    /// With a rollup resolution: `avg` (default), `sum`, `min`, `max`, `last`, `count`, or
    /// `energy` (register increase per bucket, for cumulative channels).
    #[serde(default)]
    pub agg: Option<String>,
}

/// The answer to a range query.
#[derive(Debug, Serialize)]
pub struct DataView {
    /// The series.
    pub series: SeriesView,
    /// The resolution.
    pub resolution: String,
    /// The aggregate (rollups only).
    pub agg: Option<String>,
    /// Start (Unix ms).
    pub from: i64,
    /// End (Unix ms, exclusive).
    pub to: i64,
    /// `[time, value]` pairs: a point's time, or a bucket's start; values in the unit (energy
    /// in the register's unit).
    pub points: Vec<(i64, f64)>,
}

/// Parses a time: Unix milliseconds, or RFC 3339.
pub fn parse_time(text: &str) -> Result<i64, ApiError> {
    if let Ok(ms) = text.parse::<i64>() {
        return Ok(ms);
    }
    let t = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .map_err(|_| {
            ApiError::bad_request(
                "invalid_time",
                format!(
                    "times are Unix milliseconds or RFC 3339 (2026-11-22T13:00:00Z), got {text:?}"
                ),
            )
        })?;
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000)
        .map_err(|_| ApiError::bad_request("invalid_time", "time out of range"))
}

/// Series `id` of the operator's organization, with every batch landed so far folded in.
async fn series_of(hub: &HubState, op: &Operator, id: i64) -> Result<Series, ApiError> {
    hub.folder.settle().await?;
    hub.store
        .series_by_id(op.org_id, id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("series {id}")))
}

/// Query of `GET /api/v1/series/{id}/flags`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlagsQuery {
    /// Start: Unix ms or RFC 3339 (default: the beginning).
    #[serde(default)]
    pub from: Option<String>,
    /// End, exclusive (default: no end).
    #[serde(default)]
    pub to: Option<String>,
}

/// A step of a cumulative register that the bridge flagged as it stored it: the register went
/// backwards, explained as a rollover, a reset, or a small step back.
#[derive(Debug, Serialize)]
pub struct FlagView {
    /// `rollover`, `reset` or `backwards`.
    pub kind: Anomaly,
    /// Time of the reading before the step (Unix ms).
    pub from_ts: i64,
    /// Time of the reading after it.
    pub to_ts: i64,
    /// The register before, in the series' unit.
    pub from_value: f64,
    /// The register after.
    pub to_value: f64,
    /// The energy counted for the step, in the series' unit.
    pub counted: f64,
}

/// `GET /api/v1/series/{id}/flags`: the series' flagged steps, oldest first.
pub async fn flags(
    State(hub): State<HubState>,
    op: Operator,
    ApiPath(id): ApiPath<i64>,
    ApiQuery(query): ApiQuery<FlagsQuery>,
) -> Result<axum::Json<Vec<FlagView>>, ApiError> {
    let series = series_of(&hub, &op, id).await?;
    let from = query.from.as_deref().map(parse_time).transpose()?;
    let to = query.to.as_deref().map(parse_time).transpose()?;
    let (from, to) = (from.unwrap_or(i64::MIN), to.unwrap_or(i64::MAX));
    if from >= to {
        return Err(ApiError::bad_request(
            "invalid_range",
            "from must be before to",
        ));
    }
    let flags = hub.store.flags(op.org_id, series.id, from, to).await?;
    let unit = |v: i64| unscale(i128::from(v), series.scale);
    Ok(axum::Json(
        flags
            .into_iter()
            .map(|f| FlagView {
                kind: f.kind,
                from_ts: f.from_ts,
                to_ts: f.to_ts,
                from_value: unit(f.from_value),
                to_value: unit(f.to_value),
                counted: unit(f.counted),
            })
            .collect(),
    ))
}

/// `GET /api/v1/series/{id}/data`.
pub async fn data(
    State(hub): State<HubState>,
    op: Operator,
    ApiPath(id): ApiPath<i64>,
    ApiQuery(query): ApiQuery<DataQuery>,
) -> Result<axum::Json<DataView>, ApiError> {
    let series = series_of(&hub, &op, id).await?;
    let to = query
        .to
        .as_deref()
        .map(parse_time)
        .transpose()?
        .unwrap_or_else(now_ms);
    let from = query
        .from
        .as_deref()
        .map(parse_time)
        .transpose()?
        .unwrap_or(to - 86_400_000);
    if from >= to {
        return Err(ApiError::bad_request(
            "invalid_range",
            "from must be before to",
        ));
    }
    let factor = 10f64.powi(i32::try_from(series.scale).unwrap_or(0));
    let resolution = query.resolution.as_deref().unwrap_or("raw");
    let (points, agg) = if resolution == "raw" {
        if query.agg.is_some() {
            return Err(ApiError::bad_request(
                "invalid_agg",
                "aggregates need a rollup resolution (resolution=1m, 1h or 1d)",
            ));
        }
        let points = hub.store.points(op.org_id, series.id, from, to).await?;
        check_size(points.len())?;
        (
            points
                .iter()
                .map(|p| (p.ts, p.value as f64 * factor))
                .collect(),
            None,
        )
    } else {
        let res = Resolution::parse(resolution).ok_or_else(|| {
            ApiError::bad_request(
                "invalid_resolution",
                format!("resolution is raw, 1m, 1h or 1d, not {resolution:?}"),
            )
        })?;
        let agg = query.agg.clone().unwrap_or_else(|| "avg".into());
        // The bucket holding `from` is included whole.
        let from = res.bucket_of(from);
        let buckets = hub
            .store
            .buckets(op.org_id, series.id, res, from, to)
            .await?;
        check_size(buckets.len())?;
        let values = aggregate_buckets(&hub, &op, &series, res, from, &buckets, &agg).await?;
        (
            values.into_iter().map(|(t, v)| (t, v * factor)).collect(),
            Some(agg),
        )
    };
    Ok(axum::Json(DataView {
        resolution: resolution.to_string(),
        agg,
        from,
        to,
        points,
        series: series.into(),
    }))
}

fn check_size(n: usize) -> Result<(), ApiError> {
    if n > MAX_POINTS {
        return Err(ApiError::bad_request(
            "too_many_points",
            format!(
                "the range holds more than {MAX_POINTS} points; narrow it or use a rollup resolution"
            ),
        ));
    }
    Ok(())
}

async fn aggregate_buckets(
    hub: &HubState,
    op: &Operator,
    series: &Series,
    resolution: Resolution,
    from: i64,
    buckets: &[Bucket],
    agg: &str,
) -> Result<Vec<(i64, f64)>, ApiError> {
    let pick: fn(&Bucket) -> f64 = match agg {
        "avg" => Bucket::avg,
        "sum" => |b| b.sum as f64,
        "min" => |b| b.min as f64,
        "max" => |b| b.max as f64,
        "last" => |b| b.last as f64,
        "count" => |b| b.count as f64,
        "energy" => {
            let cumulative = Channel::parse(&series.channel).is_some_and(Channel::is_cumulative);
            if !cumulative {
                return Err(ApiError::bad_request(
                    "invalid_agg",
                    format!(
                        "energy needs a cumulative register; {} is not one",
                        series.channel
                    ),
                ));
            }
            // The step into the first bucket starts from the last value before the range.
            let before = hub
                .store
                .buckets(
                    op.org_id,
                    series.id,
                    resolution,
                    from - 30 * 86_400_000,
                    from,
                )
                .await?
                .last()
                .map(|b| b.last);
            return Ok(energy_per_bucket(buckets, before)
                .into_iter()
                .map(|(t, e)| (t, e as f64))
                .collect());
        }
        other => {
            return Err(ApiError::bad_request(
                "invalid_agg",
                format!("agg is avg, sum, min, max, last, count or energy, not {other:?}"),
            ));
        }
    };
    Ok(buckets.iter().map(|b| (b.start, pick(b))).collect())
}

/// Query of `GET /api/v1/live`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LiveQuery {
    /// Comma-separated series IDs to follow (default: all of the organization's).
    #[serde(default)]
    pub series: Option<String>,
    /// Only this device's series.
    #[serde(default)]
    pub device: Option<String>,
}

/// `GET /api/v1/live`: new points as server-sent events (`event: point`, JSON data), for
/// charts at 2-second resolution. A listener that falls behind gets a `lagged` event saying
/// how many points it missed, and the stream goes on.
pub async fn live(
    State(hub): State<HubState>,
    op: Operator,
    ApiQuery(query): ApiQuery<LiveQuery>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let wanted: Option<Vec<i64>> = match &query.series {
        None => None,
        Some(list) => Some(
            list.split(',')
                .map(|s| s.trim().parse::<i64>())
                .collect::<Result<_, _>>()
                .map_err(|_| {
                    ApiError::bad_request(
                        "invalid_series",
                        "series is a comma-separated list of IDs",
                    )
                })?,
        ),
    };
    let org_id = op.org_id;
    let rx = hub.live.subscribe();
    let stream = futures_util::stream::unfold(
        (rx, wanted, query.device),
        move |(mut rx, wanted, device)| async move {
            loop {
                let event = match rx.recv().await {
                    Ok(point) => {
                        let matches = point.org_id == org_id
                            && wanted.as_ref().is_none_or(|w| w.contains(&point.series))
                            && device.as_ref().is_none_or(|d| *d == point.device);
                        if !matches {
                            continue;
                        }
                        let data = serde_json::to_string(&point).unwrap_or_default();
                        Event::default().event("point").data(data)
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        Event::default().event("lagged").data(n.to_string())
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                };
                return Some((Ok::<Event, Infallible>(event), (rx, wanted, device)));
            }
        },
    );
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}
