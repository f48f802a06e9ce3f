//! Drover's wire formats: every message the hub, the agent and the CLI exchange, and the bytes
//! that get signed. This crate does no I/O (no sockets, no files, no async runtime), so that the
//! hub, the agent and later the fleet simulator share exactly one definition of each format.
//!
//! - [`device`]: the device API (`/device/v1/...`): enrolment, check-in, update reports.
//! - [`signing`]: release manifests and the ed25519 signatures over them; key text formats.
//! - [`ids`]: device IDs and bearer tokens.
//! - [`seed`]: the seed updater protocol (`updateme`, `howitworkedout`, `time`), kept so that
//!   devices running the original updater can move to Drover untouched.
//! - [`artifact`]: recognising an artifact's format from its first bytes.
//! - [`chunk`]: the hub's storage format for columns of integers (chunks of points, rollups).
//! - [`reading`]: meter readings (meter, channel, unit, scaled value, clock state).
//! - [`batch`]: the binary telemetry batch a device sends the hub with its readings.
//! - [`spool`]: the agent's on-disk spool records (length, CRC, record ID, readings).
//! - [`error`]: the JSON error body every Drover HTTP API answers with.

pub mod artifact;
pub mod batch;
pub mod chunk;
pub mod device;
pub mod error;
pub mod ids;
pub mod reading;
pub mod seed;
pub mod signing;
pub mod spool;
pub mod validate;

/// The device protocol version. It travels in every device request body (`protocol`) and in the
/// path (`/device/v1`). A hub refuses versions it does not speak with `400 unsupported_protocol`.
pub const PROTOCOL_VERSION: u32 = 1;

/// The most update output (script stdout and stderr, captured together) a report may carry.
/// Agents truncate to this, keeping the head and the tail; hubs refuse longer reports.
pub const MAX_OUTPUT_BYTES: usize = 64 * 1024;

/// The longest one-line message (a report's `message`, a check-in's update message) a hub
/// accepts. Agents cut theirs to this.
pub const MAX_MESSAGE_BYTES: usize = 4096;
