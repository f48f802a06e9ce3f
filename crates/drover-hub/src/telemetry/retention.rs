//! Retention: raw chunks and rollups older than their resolution's configured number of days
//! are deleted once an hour. By default raw points are kept 400 days, 1-minute rollups five
//! years (energy reports read these two), and hourly and daily rollups for good (they are small,
//! and charts over years read them).

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::rollup::Resolution;
use crate::state::HubState;
use crate::store::now_ms;

/// How often retention runs.
pub const RETENTION_PERIOD: Duration = Duration::from_secs(3600);

/// Deletes what is past retention now, then once every [`RETENTION_PERIOD`] until shutdown.
pub async fn run(hub: HubState, shutdown: CancellationToken) {
    loop {
        apply(&hub).await;
        tokio::select! {
            () = tokio::time::sleep(RETENTION_PERIOD) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

/// One retention pass.
pub async fn apply(hub: &HubState) {
    let day = 86_400_000i64;
    let now = now_ms();
    let passes = [
        (None, hub.config.retention_raw_days),
        (Some(Resolution::Minute), hub.config.retention_1m_days),
        (Some(Resolution::Hour), hub.config.retention_1h_days),
        (Some(Resolution::Day), hub.config.retention_1d_days),
    ];
    for (resolution, days) in passes {
        if days == 0 {
            continue;
        }
        let before = now - i64::from(days) * day;
        match hub.store.delete_older_than(resolution, before).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                rows = n,
                resolution = resolution.map_or("raw", Resolution::name),
                "retention deleted old data"
            ),
            Err(e) => tracing::warn!(error = %e, "retention failed; will retry"),
        }
    }
}
