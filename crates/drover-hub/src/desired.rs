//! What a device should be: its release, config, poll interval and retry generation, worked out
//! from the fleet, the device's own settings and the fleet's targets.
//!
//! The result's `etag` is a hash of everything in it, so that a device that already holds this
//! state can be answered with an empty `204` without the hub sending (or the device parsing)
//! anything.

use drover_protocol::device::{DesiredState, ReleaseOffer};
use drover_protocol::ids::sha256_hex;

use crate::store::{Device, Fleet, Release, Store, StoreResult};

/// The path devices download an artifact from.
pub fn artifact_path(sha256: &str) -> String {
    format!("/device/v1/artifacts/{sha256}")
}

/// The release a device should run: its pin, else the fleet's target for its type.
pub async fn target_release(
    store: &Store,
    device: &Device,
    fleet: &Fleet,
) -> StoreResult<Option<Release>> {
    if let Some(pinned) = device.pinned_release_id
        && let Some(release) = store.release_by_id(device.org_id, pinned).await?
    {
        return Ok(Some(release));
    }
    store
        .target_for(device.org_id, fleet.id, &device.device_type)
        .await
}

/// The device's config: the fleet's with the device's own merged over it.
pub fn effective_config(fleet: &Fleet, device: &Device) -> serde_json::Value {
    let mut config = fleet.config.clone();
    merge(&mut config, &device.config);
    config
}

/// Merges `over` into `base`: objects merge key by key (recursively); anything else replaces.
pub fn merge(base: &mut serde_json::Value, over: &serde_json::Value) {
    match (base, over) {
        (serde_json::Value::Object(base), serde_json::Value::Object(over)) => {
            for (key, value) in over {
                match base.get_mut(key) {
                    Some(existing) => merge(existing, value),
                    None => {
                        base.insert(key.clone(), value.clone());
                    }
                }
            }
        }
        (base, over) => *base = over.clone(),
    }
}

/// Builds the desired state for a device.
pub fn desired_state(fleet: &Fleet, device: &Device, release: Option<&Release>) -> DesiredState {
    let offer = release.map(|r| ReleaseOffer {
        version: r.version.clone(),
        module: r.module,
        device_type: r.device_type.clone(),
        artifact_url: artifact_path(&r.sha256),
        size: u64::try_from(r.size).unwrap_or(0),
        sha256: r.sha256.clone(),
        signature: r.signature.clone().unwrap_or_default(),
    });
    let mut state = DesiredState {
        etag: String::new(),
        poll_interval_s: u64::try_from(fleet.poll_interval_s).unwrap_or(60),
        release: offer,
        config: effective_config(fleet, device),
        retry_generation: u64::try_from(fleet.deploy_generation + device.retry_generation)
            .unwrap_or(0),
    };
    // serde_json writes object keys in a fixed (sorted) order, so equal states hash equally.
    let body = serde_json::to_vec(&state).unwrap_or_default();
    state.etag = sha256_hex(&body)[..20].to_string();
    state
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn device_config_merges_over_fleet_config() {
        let mut base = json!({"meter": {"name": "a", "interval": 5}, "site": "x"});
        merge(&mut base, &json!({"meter": {"name": "b"}, "extra": [1]}));
        assert_eq!(
            base,
            json!({"meter": {"name": "b", "interval": 5}, "site": "x", "extra": [1]})
        );
    }
}
