//! The device API: what the agent and the hub say to each other under `/device/v1`.
//!
//! The agent always opens the connection (outbound HTTPS only, so any firewall or NAT is fine):
//! - `POST /device/v1/enroll` with an [`EnrollRequest`] → [`EnrollResponse`];
//! - `POST /device/v1/checkin` with a [`CheckinRequest`] → `204 No Content` when nothing
//!   changed, or `200` with a [`DesiredState`];
//! - `POST /device/v1/reports` with a [`ReportBatch`] → [`ReportAck`];
//! - `GET /device/v1/artifacts/{sha256}` → the artifact bytes (Range and ETag honoured).
//!
//! docs/protocol.md describes each message field by field, with every status code.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::ids::DeviceId;

/// The install module a release is made for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Module {
    /// An archive unpacked into `releases/<version>/`, switched to by an atomic `current`
    /// symlink swap, health-checked and rolled back when the check fails.
    App,
    /// An archive holding `update.sh` (at its root or one folder down), or a bare shell script,
    /// run with a timeout, as the seed updater did.
    Script,
}

impl Module {
    /// The module's name on the wire and in manifests.
    pub fn as_str(self) -> &'static str {
        match self {
            Module::App => "app",
            Module::Script => "script",
        }
    }

    /// Parses `app` or `script`.
    pub fn parse(text: &str) -> Option<Module> {
        match text {
            "app" => Some(Module::App),
            "script" => Some(Module::Script),
            _ => None,
        }
    }
}

/// A device's standing with its fleet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceStatus {
    /// Enrolled and waiting for an operator to accept it.
    Pending,
    /// Accepted: it may check in and receive updates.
    Accepted,
    /// Its credential was revoked; it is refused everywhere.
    Revoked,
}

impl DeviceStatus {
    /// The status's name on the wire and in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceStatus::Pending => "pending",
            DeviceStatus::Accepted => "accepted",
            DeviceStatus::Revoked => "revoked",
        }
    }

    /// Parses a status name.
    pub fn parse(text: &str) -> Option<DeviceStatus> {
        match text {
            "pending" => Some(DeviceStatus::Pending),
            "accepted" => Some(DeviceStatus::Accepted),
            "revoked" => Some(DeviceStatus::Revoked),
            _ => None,
        }
    }
}

/// Facts a device reports about itself. Sent at enrolment and in a check-in whenever they
/// changed (uptime aside), and at least every hour.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Facts {
    /// Operating system and version, such as `Debian GNU/Linux 12 (bookworm)`.
    #[serde(default)]
    pub os: String,
    /// CPU architecture, such as `aarch64`.
    #[serde(default)]
    pub arch: String,
    /// The device's primary local IP address, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    /// Seconds since the device booted.
    #[serde(default)]
    pub uptime_s: u64,
    /// Host name.
    #[serde(default)]
    pub hostname: String,
    /// Tags from the agent's config (such as `shop`, `sweden`).
    #[serde(default)]
    pub tags: Vec<String>,
    /// Attributes from the agent's config (such as `site = "Nyköping 3"`).
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
}

/// `POST /device/v1/enroll`: a new device asks to join the fleet its provisioning key belongs
/// to. Sending the same public key again (after a crash lost the answer) returns the same device
/// ID with a fresh credential, unless the device was revoked.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    /// Must be [`crate::PROTOCOL_VERSION`].
    pub protocol: u32,
    /// The fleet's provisioning key (`drv_p_...`).
    pub provisioning_key: String,
    /// The device's own ed25519 identity key, `ed25519:<base64>`.
    pub public_key: String,
    /// Signature with the identity key over [`crate::signing::enrolment_message`].
    pub proof: String,
    /// The device type (hardware), such as `raspberrypi4-arm64`.
    pub device_type: String,
    /// The agent's version.
    pub agent_version: String,
    /// Facts about the device.
    #[serde(default)]
    pub facts: Facts,
}

/// The hub's answer to an enrolment.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EnrollResponse {
    /// The device's ID, to print on its label.
    pub device_id: DeviceId,
    /// The device credential (`drv_d_...`): a bearer token for every later request. Stored by
    /// the agent in a 0600 file; the hub keeps only its hash.
    pub credential: String,
    /// `accepted`, or `pending` until an operator accepts the device.
    pub status: DeviceStatus,
    /// The fleet's name.
    pub fleet: String,
    /// The fleet's release public key, if it has one. An agent whose config pins a release key
    /// ignores this; otherwise it keeps the key it first received (trust on first use).
    pub release_key: Option<String>,
}

/// Where the agent's update machinery stands, as reported in each check-in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpdatePhase {
    /// Nothing in progress.
    Idle,
    /// Downloading an artifact.
    Downloading,
    /// Installing (unpacking, running the script, swapping, health-checking).
    Installing,
    /// The last attempt failed; waiting before the next one.
    BackingOff,
    /// The release failed too often and is held until an operator acts.
    Held,
}

impl UpdatePhase {
    /// The phase's name on the wire and in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            UpdatePhase::Idle => "idle",
            UpdatePhase::Downloading => "downloading",
            UpdatePhase::Installing => "installing",
            UpdatePhase::BackingOff => "backing_off",
            UpdatePhase::Held => "held",
        }
    }
}

/// The update state a check-in carries.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct UpdateStatus {
    /// Where the agent stands.
    pub phase: UpdatePhase,
    /// The release being worked on, backed off or held, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<String>,
    /// How many attempts at that release have failed.
    #[serde(default)]
    pub failures: u32,
    /// Why the last attempt failed, or why the release is held.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl UpdateStatus {
    /// Nothing in progress.
    pub fn idle() -> UpdateStatus {
        UpdateStatus {
            phase: UpdatePhase::Idle,
            release: None,
            failures: 0,
            message: None,
        }
    }
}

/// `POST /device/v1/checkin`: the device says where it stands and asks what it should do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckinRequest {
    /// Must be [`crate::PROTOCOL_VERSION`].
    pub protocol: u32,
    /// The `etag` of the last [`DesiredState`] the device received; the hub answers `204` when
    /// it still holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_etag: Option<String>,
    /// The release installed and committed on the device (`None` before the first update).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_release: Option<String>,
    /// The agent's version.
    pub agent_version: String,
    /// The update machinery's state.
    pub update: UpdateStatus,
    /// Facts, when they changed or were last sent over an hour ago.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub facts: Option<Facts>,
    /// The state of the device's telemetry (spool and data budget), when it has meters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub telemetry: Option<TelemetryStatus>,
}

/// How the device's telemetry is doing, as reported in check-ins: what waits in its spool, what
/// the spool had to drop (never silently), and how much of its monthly data budget it used.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TelemetryStatus {
    /// Readings waiting in the spool.
    #[serde(default)]
    pub spooled: u64,
    /// Readings the spool lost since the device was set up: dropped because it was full, or
    /// found damaged, or refused by a failing disk; never silently.
    #[serde(default)]
    pub dropped: u64,
    /// Bytes sent for telemetry this calendar month (UTC), counted by the agent.
    #[serde(default)]
    pub month_bytes: u64,
    /// The monthly budget in bytes, if one is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_bytes: Option<u64>,
    /// The batch interval in use (widened to stay inside the budget), in seconds.
    #[serde(default)]
    pub batch_interval_s: u64,
}

/// A release the device should run, as offered in a [`DesiredState`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseOffer {
    /// The release version.
    pub version: String,
    /// The install module.
    pub module: Module,
    /// The device type the release is for (`None`: any).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_type: Option<String>,
    /// Where to download the artifact: a path on the hub (`/device/v1/artifacts/<sha256>`).
    pub artifact_url: String,
    /// The artifact's size in bytes.
    pub size: u64,
    /// The artifact's SHA-256, lower-case hex.
    pub sha256: String,
    /// The ed25519 signature over the release manifest (base64).
    pub signature: String,
}

impl ReleaseOffer {
    /// The manifest the signature covers.
    pub fn manifest(&self) -> crate::signing::ReleaseManifest<'_> {
        crate::signing::ReleaseManifest {
            version: &self.version,
            module: self.module,
            device_type: self.device_type.as_deref(),
            sha256: &self.sha256,
            size: self.size,
        }
    }
}

/// What the hub wants the device to be: the answer to a check-in when something changed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DesiredState {
    /// Names this state; the device sends it back as `desired_etag`.
    pub etag: String,
    /// Seconds until the next check-in. The agent clamps it to its own floor and ceiling and
    /// adds jitter, so no value can make it poll in a tight loop.
    pub poll_interval_s: u64,
    /// The release the device should run; `None` means "keep what you have".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<ReleaseOffer>,
    /// The device's config: the fleet's config with the device's own merged over it.
    #[serde(default)]
    pub config: serde_json::Value,
    /// Raised when an operator asks for held releases to be tried again; the agent forgets its
    /// failure counts when this changes.
    #[serde(default)]
    pub retry_generation: u64,
}

/// How an update attempt went, step by step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReportState {
    /// The artifact is being downloaded.
    Downloading,
    /// The artifact was verified and is being installed.
    Installing,
    /// The release is installed and committed.
    Success,
    /// The attempt failed; what was running before still runs.
    Failure,
    /// The new release failed its health check and the previous one was restored.
    RolledBack,
    /// The release failed too often; the agent will not try it again until an operator acts.
    Held,
}

impl ReportState {
    /// The state's name on the wire and in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            ReportState::Downloading => "downloading",
            ReportState::Installing => "installing",
            ReportState::Success => "success",
            ReportState::Failure => "failure",
            ReportState::RolledBack => "rolled_back",
            ReportState::Held => "held",
        }
    }

    /// Parses a state name.
    pub fn parse(text: &str) -> Option<ReportState> {
        Some(match text {
            "downloading" => ReportState::Downloading,
            "installing" => ReportState::Installing,
            "success" => ReportState::Success,
            "failure" => ReportState::Failure,
            "rolled_back" => ReportState::RolledBack,
            "held" => ReportState::Held,
            _ => return None,
        })
    }

    /// Whether the attempt is over in this state.
    pub fn is_final(self) -> bool {
        !matches!(self, ReportState::Downloading | ReportState::Installing)
    }
}

/// One step of an update attempt, as the device saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateReport {
    /// Per-device sequence number, increasing by at least one per report and never reused; the
    /// hub ignores reports it has already seen, so a resend is harmless.
    pub seq: u64,
    /// When it happened on the device (Unix milliseconds).
    pub at_ms: i64,
    /// The release version.
    pub release: String,
    /// Which attempt at this release this is (1, 2, ...).
    pub attempt: u32,
    /// The step.
    pub state: ReportState,
    /// A one-line description.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Captured output (at most [`crate::MAX_OUTPUT_BYTES`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
}

/// `POST /device/v1/reports`: reports in the order they happened, oldest first. Reports made
/// while the hub was out of reach wait in the agent's outbox and arrive here later.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportBatch {
    /// Must be [`crate::PROTOCOL_VERSION`].
    pub protocol: u32,
    /// The reports, in `seq` order; at most 100.
    pub reports: Vec<UpdateReport>,
}

/// The most reports one [`ReportBatch`] may carry.
pub const MAX_REPORTS_PER_BATCH: usize = 100;

/// The hub's answer to a [`ReportBatch`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReportAck {
    /// Every report with `seq` up to this one is stored; the agent may delete them.
    pub acked_through: u64,
}

/// Cuts `text` to at most `max` bytes on character boundaries, keeping its head and its tail
/// (where a failing script usually says why) with a marker between them.
///
/// ```
/// let out = drover_protocol::device::truncate_output(&"x".repeat(100), 40);
/// assert!(out.len() <= 40);
/// assert!(out.contains("bytes cut"));
/// ```
pub fn truncate_output(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let marker = format!("\n[... {} bytes cut ...]\n", text.len().saturating_sub(max));
    let keep = max.saturating_sub(marker.len());
    let head_len = floor_char_boundary(text, keep / 2);
    let tail_start = ceil_char_boundary(text, text.len() - (keep - head_len));
    let mut out = String::with_capacity(max);
    out.push_str(&text[..head_len]);
    out.push_str(&marker);
    out.push_str(&text[tail_start..]);
    out
}

fn floor_char_boundary(text: &str, mut i: usize) -> usize {
    while i > 0 && !text.is_char_boundary(i) {
        i -= 1;
    }
    i
}

fn ceil_char_boundary(text: &str, mut i: usize) -> usize {
    while i < text.len() && !text.is_char_boundary(i) {
        i += 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkin_round_trips_and_refuses_unknown_fields() {
        let req = CheckinRequest {
            protocol: 1,
            desired_etag: Some("e1".into()),
            current_release: Some("1.0".into()),
            agent_version: "0.1.0".into(),
            update: UpdateStatus::idle(),
            facts: None,
            telemetry: None,
        };
        let json = serde_json::to_string(&req).unwrap();
        assert_eq!(serde_json::from_str::<CheckinRequest>(&json).unwrap(), req);
        let bad = json.replace("\"protocol\"", "\"protocl\"");
        assert!(serde_json::from_str::<CheckinRequest>(&bad).is_err());
    }

    #[test]
    fn golden_checkin_bytes() {
        let req = CheckinRequest {
            protocol: 1,
            desired_etag: None,
            current_release: None,
            agent_version: "0.1.0".into(),
            update: UpdateStatus::idle(),
            facts: None,
            telemetry: None,
        };
        assert_eq!(
            serde_json::to_string(&req).unwrap(),
            r#"{"protocol":1,"agent_version":"0.1.0","update":{"phase":"idle","failures":0}}"#
        );
    }

    #[test]
    fn truncation_keeps_head_and_tail_on_char_boundaries() {
        let text = format!("{}{}", "é".repeat(1000), "the real error");
        let out = truncate_output(&text, 200);
        assert!(out.len() <= 200, "{}", out.len());
        assert!(out.starts_with('é'));
        assert!(out.ends_with("the real error"));
        assert_eq!(truncate_output("short", 200), "short");
    }
}
