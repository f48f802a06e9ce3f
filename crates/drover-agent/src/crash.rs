//! Test hook: crash the agent at a named step of an update, as `kill -9` or a power cut would.
//!
//! When the environment variable `DROVER_AGENT_CRASH_AT` names a step, the agent calls
//! `std::process::abort()` exactly there: no destructors, no flushing, no clean shutdown. The
//! variable is read once, when [`crate::run`] starts. Integration tests set it on an agent
//! process, let it die, start it again without it and check that it ends consistent.
//!
//! The steps, in the order an update passes them:
//! - `download`: after the first chunk was written to the `.part` file and flushed;
//! - `verified`: after the verified download was renamed into place;
//! - `unpacked`: after the archive was unpacked and its directory renamed into place;
//! - `stopped`: after the app's stop command ran;
//! - `swapped`: after the `current` symlink was swapped to the new release;
//! - `started`: after the app's start command ran;
//! - `committed`: after state.json says the release is committed, before the success report is
//!   written to the outbox;
//! - `rolled-back`: after a rollback restored and started the previous release, before the
//!   outcome is recorded.
//!
//! Crashes while `update.sh` or a health check runs need no hook: the test's script kills its
//! parent (`kill -9 $PPID`). That works because the agent spawns `update.sh` and the `sh -c` of
//! app commands directly, so their parent process is the agent itself.

/// The environment variable naming the step to crash at.
pub const CRASH_ENV: &str = "DROVER_AGENT_CRASH_AT";

/// A step an update can be crashed at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashPoint {
    /// First chunk of the download written.
    Download,
    /// Verified download in place.
    Verified,
    /// Release or script unpacked.
    Unpacked,
    /// Old app stopped.
    Stopped,
    /// `current` swapped.
    Swapped,
    /// New app started.
    Started,
    /// Committed in state.json, success not yet reported.
    Committed,
    /// Previous release restored.
    RolledBack,
}

impl CrashPoint {
    /// The step's name, as written in `DROVER_AGENT_CRASH_AT`.
    pub fn as_str(self) -> &'static str {
        match self {
            CrashPoint::Download => "download",
            CrashPoint::Verified => "verified",
            CrashPoint::Unpacked => "unpacked",
            CrashPoint::Stopped => "stopped",
            CrashPoint::Swapped => "swapped",
            CrashPoint::Started => "started",
            CrashPoint::Committed => "committed",
            CrashPoint::RolledBack => "rolled-back",
        }
    }
}

/// The crash point chosen for this process, if any.
#[derive(Debug, Clone, Default)]
pub struct CrashPoints {
    at: Option<String>,
}

impl CrashPoints {
    /// Reads `DROVER_AGENT_CRASH_AT`.
    pub fn from_env() -> CrashPoints {
        let at = std::env::var(CRASH_ENV).ok().filter(|v| !v.is_empty());
        if let Some(step) = &at {
            tracing::warn!(step, "test hook armed: the agent will abort at this step");
        }
        CrashPoints { at }
    }

    /// No crash point (what library callers and unit tests use).
    pub fn none() -> CrashPoints {
        CrashPoints { at: None }
    }

    /// Aborts the process if `point` is the chosen step.
    pub fn hit(&self, point: CrashPoint) {
        if self.at.as_deref() == Some(point.as_str()) {
            eprintln!("drover-agent: {CRASH_ENV}={}: aborting", point.as_str());
            std::process::abort();
        }
    }
}
