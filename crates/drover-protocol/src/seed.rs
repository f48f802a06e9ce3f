//! The seed updater protocol, spoken by devices that still run the original (Node.js) updater,
//! so that they can move to Drover without anyone touching them.
//!
//! It is served per fleet, off by default, under a base URL holding a fleet-scoped secret
//! (`/seed/<secret>`); that secret is the only thing that authenticates these devices, since the
//! original protocol has no authentication at all.
//!
//! - `GET {base}/updateme?deviceId=..&snapshotId=..&updaterVersion=..` → [`UpdateMeResponse`]
//! - `POST {base}/howitworkedout` with [`HowItWorkedOut`] → `{"status":"ok"}`
//! - `GET {base}/time` → [`TimeResponse`]
//!
//! A release's sequence number within its fleet is its snapshot ID.

use serde::{Deserialize, Deserializer, Serialize};

/// The query string of `GET {base}/updateme`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UpdateMeQuery {
    /// The device's self-generated ID.
    pub device_id: String,
    /// The snapshot the device runs; `0` (or missing, or not a number) means none.
    #[serde(default)]
    pub snapshot_id: Option<String>,
    /// The updater's version, such as `v1.20.3`.
    #[serde(default)]
    pub updater_version: Option<String>,
}

impl UpdateMeQuery {
    /// The snapshot as a number, the way the seed updater reads its `snapshot-id` file: missing
    /// or non-numeric counts as 0.
    pub fn snapshot(&self) -> i64 {
        self.snapshot_id
            .as_deref()
            .and_then(|s| s.trim().parse::<i64>().ok())
            .unwrap_or(0)
    }
}

/// The answer to `updateme`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UpdateMeResponse {
    /// `noUpdateNeeded` or `updateNeeded`.
    pub status: String,
    /// With `updateNeeded`: the snapshot to move to, as a string (as the protocol's examples
    /// show).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_id: Option<String>,
    /// With `updateNeeded`: where to download it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub download_url: Option<String>,
    /// `zip` (the updater's default), `sh` or `js`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub download_type: Option<String>,
    /// Any JSON, handed to the update script in the `config` environment variable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<serde_json::Value>,
    /// Seconds between polls from now on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_interval: Option<u64>,
    /// Ask the device to open its SSH tunnel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh_tunnel_requested: Option<bool>,
}

impl UpdateMeResponse {
    /// `{"status":"noUpdateNeeded"}`, with the poll interval.
    pub fn no_update_needed(update_interval: Option<u64>) -> UpdateMeResponse {
        UpdateMeResponse {
            status: "noUpdateNeeded".into(),
            snapshot_id: None,
            download_url: None,
            download_type: None,
            config: None,
            update_interval,
            ssh_tunnel_requested: None,
        }
    }
}

/// The body of `POST {base}/howitworkedout`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HowItWorkedOut {
    /// The device's ID.
    pub device_id: String,
    /// The snapshot the update was for (a string or a number on the wire).
    #[serde(deserialize_with = "string_or_number")]
    pub snapshot_id: String,
    /// Whether it worked. The seed updater sends the strings `"true"` and `"false"`; a JSON
    /// boolean is accepted too.
    #[serde(deserialize_with = "seed_bool")]
    pub success: bool,
    /// The update script's output.
    #[serde(default)]
    pub output: String,
}

/// The answer to `GET {base}/time`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimeResponse {
    /// The hub's time, ISO-8601 in UTC with milliseconds (`2017-05-21T15:00:00.000Z`).
    pub data: String,
}

fn string_or_number<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        S(String),
        N(i64),
    }
    Ok(match Either::deserialize(d)? {
        Either::S(s) => s,
        Either::N(n) => n.to_string(),
    })
}

fn seed_bool<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        S(String),
        B(bool),
    }
    match Either::deserialize(d)? {
        Either::B(b) => Ok(b),
        Either::S(s) if s == "true" => Ok(true),
        Either::S(s) if s == "false" => Ok(false),
        Either::S(s) => Err(serde::de::Error::custom(format!(
            "success must be \"true\" or \"false\", got {s:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn success_arrives_as_a_string() {
        let body = r#"{"deviceId":"abc","snapshotId":"4","success":"false","output":"boom"}"#;
        let h: HowItWorkedOut = serde_json::from_str(body).unwrap();
        assert!(!h.success);
        assert_eq!(h.snapshot_id, "4");
        let body = r#"{"deviceId":"abc","snapshotId":4,"success":true}"#;
        let h: HowItWorkedOut = serde_json::from_str(body).unwrap();
        assert!(h.success);
        assert_eq!(h.output, "");
        let body = r#"{"deviceId":"abc","snapshotId":4,"success":"yes"}"#;
        assert!(serde_json::from_str::<HowItWorkedOut>(body).is_err());
    }

    #[test]
    fn no_update_needed_is_minimal() {
        assert_eq!(
            serde_json::to_string(&UpdateMeResponse::no_update_needed(None)).unwrap(),
            r#"{"status":"noUpdateNeeded"}"#
        );
    }

    #[test]
    fn snapshot_parsing_matches_the_seed_updater() {
        let q = |s: Option<&str>| UpdateMeQuery {
            device_id: "d".into(),
            snapshot_id: s.map(String::from),
            updater_version: None,
        };
        assert_eq!(q(Some("26")).snapshot(), 26);
        assert_eq!(q(Some("abc")).snapshot(), 0);
        assert_eq!(q(None).snapshot(), 0);
    }
}
