//! The Drover device agent, as a library: the `drover-agent` binary is a thin shell around
//! [`run`], and tests and `drover demo` call the same function with their own shutdown token.
//!
//! What the agent does: enrols with the hub using a fleet provisioning key and its own key pair,
//! checks in on a jittered, clamped interval, downloads signed releases (resuming after cuts and
//! verifying size, SHA-256 and the ed25519 release signature before anything runs), installs
//! them with the `script` module (`update.sh`, the seed updater's contract) or the `app` module
//! (release directories, an atomic `current` symlink swap, a health check and rollback), and
//! reports every step through an on-disk outbox. It survives `kill -9` at any moment: see
//! [`update::runner`] for how each step resumes, and [`layout`] for the state directory.
//!
//! Module map:
//! - [`agent`]: the main loop ([`run`]): check-ins, reports, starting update tasks.
//! - [`update`]: the update state machine, its plan and its runner; failure and hold policy.
//! - [`download`], [`archive`], [`script`], [`app`], [`process`]: the steps of an update.
//! - [`client`]: HTTP calls to the hub's device API.
//! - [`identity`], [`facts`]: who the device is and what it reports about itself.
//! - [`config`], [`duration`]: the TOML config.
//! - [`device_config`]: the hub's config for the device, in `config.json`, and `[app] reload`.
//! - [`layout`], [`fsutil`], [`outbox`]: the state directory and crash-safe writes.
//! - [`meters`]: meter sources (Modbus TCP, S0 pulses, commands, simulated) producing readings.
//! - [`spool`]: meter readings on disk until the hub acknowledges them (bounded, crash-safe).
//! - [`sender`]: batches from the spool to the hub, exactly once; the monthly data budget.
//! - [`telemetry`]: starts and stops meters → spool → sender with the agent.
//! - [`schedule`]: intervals, jitter, backoff.
//! - [`crash`]: the `DROVER_AGENT_CRASH_AT` test hook.
//! - [`mod@status`]: `drover-agent status`.

pub mod agent;
pub mod app;
pub mod archive;
pub mod client;
pub mod config;
pub mod crash;
pub mod device_config;
pub mod download;
pub mod duration;
pub mod facts;
pub mod fsutil;
pub mod identity;
pub mod layout;
pub mod meters;
pub mod outbox;
pub mod process;
pub mod schedule;
pub mod script;
pub mod sender;
pub mod spool;
pub mod status;
pub mod telemetry;
pub mod update;

#[cfg(test)]
mod testutil;

pub use agent::run;
pub use config::{AgentConfig, ConfigError, Secret};
pub use status::{AgentStatus, status};

/// The agent's version, reported at enrolment and in every check-in.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");
