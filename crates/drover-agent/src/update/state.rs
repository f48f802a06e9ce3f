//! `state.json`: the update state machine as it is persisted.
//!
//! The file holds the committed release, the attempt in progress (with the step it is at), and
//! the failure record of the target release. Each step is written here *before* it starts, so
//! after a crash the agent knows which step may have been cut short and resumes from it (see
//! `crate::update::runner` for what resuming each step means).

use std::path::{Path, PathBuf};

use drover_protocol::device::{DesiredState, Module, ReleaseOffer, UpdatePhase, UpdateStatus};
use serde::{Deserialize, Serialize};

use crate::fsutil::{self, FileError};

/// Everything in `state.json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UpdateState {
    /// The committed release: what the device runs and reports as `current_release`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<Installed>,
    /// The app release that ran before `current` (kept on disk for a manual rollback).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_app: Option<String>,
    /// The attempt in progress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<Attempt>,
    /// Failures of the target release.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failures: Option<FailureRecord>,
    /// The hub's `retry_generation` the failure record belongs to.
    #[serde(default)]
    pub retry_generation: u64,
    /// How many attempts recent releases have had, most recent last. Kept apart from the
    /// failure record (which a retry forgets) so that an attempt number is never used twice at
    /// one release: the hub keys its attempt history by release and number.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tried: Vec<Tried>,
}

/// How many releases [`UpdateState::tried`] remembers.
pub const MAX_TRIED: usize = 16;

/// The attempts made at one release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tried {
    /// The release.
    pub release: String,
    /// The number of its latest attempt.
    pub attempts: u32,
}

/// A committed release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Installed {
    /// Its version.
    pub version: String,
    /// The module that installed it.
    pub module: Module,
}

/// An update attempt in progress.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attempt {
    /// What is being installed.
    pub offer: ReleaseOffer,
    /// The device config to hand to scripts and commands.
    #[serde(default)]
    pub config: serde_json::Value,
    /// Which attempt at this release (1, 2, ...).
    pub number: u32,
    /// The app release that was current when the attempt began (recorded before the stop
    /// command runs, so a rollback knows where to go back to).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old_app: Option<String>,
    /// Where the attempt stands.
    pub step: Step,
}

/// The steps of an attempt. Each is persisted before it starts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "step", rename_all = "snake_case")]
pub enum Step {
    /// Downloading and verifying the artifact.
    Downloading,
    /// Unpacking the verified artifact (script: into `work/`, app: into `releases/`).
    Unpacking,
    /// `update.sh` is running. Found here after a restart, its outcome is unknown.
    ScriptRunning,
    /// The old app release is being stopped.
    Stopping,
    /// `current` is being pointed at the new release.
    Swapping,
    /// The new release's start command is running.
    Starting,
    /// The new release is being health-checked.
    HealthChecking,
    /// The new release failed: stopping it, restoring the old one, starting that.
    RollingBack {
        /// Why.
        message: String,
        /// The failing command's output.
        output: String,
    },
    /// The attempt is over; its report is being written.
    Finished {
        /// How it ended.
        outcome: Outcome,
    },
}

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// Installed and committed.
    Success {
        /// What the install printed.
        output: String,
    },
    /// Failed; what ran before still runs.
    Failure {
        /// Why.
        message: String,
        /// Captured output.
        output: String,
    },
    /// The new release failed and the previous one was restored.
    RolledBack {
        /// Why.
        message: String,
        /// Captured output.
        output: String,
    },
}

/// The failures of one release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailureRecord {
    /// The release.
    pub release: String,
    /// How many attempts failed.
    pub failures: u32,
    /// No new attempt before this time (Unix ms; persisted, so a restart does not skip it).
    pub retry_at_ms: i64,
    /// Held until an operator acts.
    pub held: bool,
    /// Why the last attempt failed.
    pub last_error: String,
}

impl Step {
    /// The step's name, as written in state.json.
    pub fn name(&self) -> &'static str {
        match self {
            Step::Downloading => "downloading",
            Step::Unpacking => "unpacking",
            Step::ScriptRunning => "script_running",
            Step::Stopping => "stopping",
            Step::Swapping => "swapping",
            Step::Starting => "starting",
            Step::HealthChecking => "health_checking",
            Step::RollingBack { .. } => "rolling_back",
            Step::Finished { .. } => "finished",
        }
    }
}

impl UpdateState {
    /// The committed version, as reported in check-ins.
    pub fn current_version(&self) -> Option<&str> {
        self.current.as_ref().map(|c| c.version.as_str())
    }

    /// The failure record, if it is about `release`.
    pub fn failures_of(&self, release: &str) -> Option<&FailureRecord> {
        self.failures.as_ref().filter(|f| f.release == release)
    }

    /// The number of the latest attempt at `release` (0 if none is remembered).
    pub fn tries_of(&self, release: &str) -> u32 {
        let tried = self
            .tried
            .iter()
            .find(|t| t.release == release)
            .map_or(0, |t| t.attempts);
        tried.max(self.failures_of(release).map_or(0, |f| f.failures))
    }

    /// Remembers that attempt `number` at `release` began.
    pub fn record_try(&mut self, release: &str, number: u32) {
        self.tried.retain(|t| t.release != release);
        self.tried.push(Tried {
            release: release.to_string(),
            attempts: number,
        });
        let excess = self.tried.len().saturating_sub(MAX_TRIED);
        self.tried.drain(..excess);
    }

    /// Applies a new desired state: a new `retry_generation` forgets the failure counts (an
    /// operator asked for a retry), and so does a target other than the failing release.
    pub fn apply_desired(&mut self, desired: &DesiredState) {
        if desired.retry_generation != self.retry_generation {
            self.retry_generation = desired.retry_generation;
            self.failures = None;
        }
        let target = desired.release.as_ref().map(|r| r.version.as_str());
        if self
            .failures
            .as_ref()
            .is_some_and(|f| Some(f.release.as_str()) != target)
        {
            self.failures = None;
        }
    }

    /// The update state as a check-in reports it.
    pub fn status(&self, now_ms: i64) -> UpdateStatus {
        if let Some(attempt) = &self.attempt {
            let phase = match attempt.step {
                Step::Downloading => UpdatePhase::Downloading,
                _ => UpdatePhase::Installing,
            };
            let failures = self.failures_of(&attempt.offer.version);
            return UpdateStatus {
                phase,
                release: Some(attempt.offer.version.clone()),
                failures: failures.map_or(0, |f| f.failures),
                message: None,
            };
        }
        let Some(record) = &self.failures else {
            return UpdateStatus::idle();
        };
        let phase = if record.held {
            UpdatePhase::Held
        } else if record.retry_at_ms > now_ms {
            UpdatePhase::BackingOff
        } else {
            UpdatePhase::Idle
        };
        UpdateStatus {
            phase,
            release: Some(record.release.clone()),
            failures: record.failures,
            message: Some(record.last_error.clone()),
        }
    }
}

/// `state.json` and its in-memory copy. Every change is written before it is believed.
#[derive(Debug)]
pub struct StateStore {
    path: PathBuf,
    state: UpdateState,
}

impl StateStore {
    /// Loads `state.json` (a missing file is a fresh device).
    pub fn open(path: &Path) -> Result<StateStore, FileError> {
        let state = fsutil::read_json(path)?.unwrap_or_default();
        Ok(StateStore {
            path: path.to_path_buf(),
            state,
        })
    }

    /// The current state.
    pub fn get(&self) -> &UpdateState {
        &self.state
    }

    /// Changes the state and persists it; the in-memory copy changes only if the write
    /// succeeded.
    pub fn update<R>(
        &mut self,
        change: impl FnOnce(&mut UpdateState) -> R,
    ) -> Result<R, FileError> {
        let mut next = self.state.clone();
        let result = change(&mut next);
        if next != self.state {
            fsutil::write_json_atomic(&self.path, &next, fsutil::PUBLIC)?;
            self.state = next;
        }
        Ok(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(release: &str, held: bool, retry_at_ms: i64) -> FailureRecord {
        FailureRecord {
            release: release.into(),
            failures: 3,
            retry_at_ms,
            held,
            last_error: "update.sh exited with code 1".into(),
        }
    }

    fn desired(release: Option<&str>, retry_generation: u64) -> DesiredState {
        DesiredState {
            etag: "e".into(),
            poll_interval_s: 10,
            release: release.map(|v| ReleaseOffer {
                version: v.into(),
                module: Module::Script,
                device_type: None,
                artifact_url: "/x".into(),
                size: 1,
                sha256: "0".repeat(64),
                signature: String::new(),
            }),
            config: serde_json::Value::Null,
            retry_generation,
        }
    }

    #[test]
    fn a_held_release_is_reported_with_its_reason() {
        let state = UpdateState {
            failures: Some(record("2.0", true, 0)),
            ..UpdateState::default()
        };
        let status = state.status(1_000);
        assert_eq!(status.phase, UpdatePhase::Held);
        assert_eq!(status.release.as_deref(), Some("2.0"));
        assert_eq!(status.failures, 3);
        assert_eq!(
            status.message.as_deref(),
            Some("update.sh exited with code 1")
        );
        let backing_off = UpdateState {
            failures: Some(record("2.0", false, 5_000)),
            ..UpdateState::default()
        };
        assert_eq!(backing_off.status(1_000).phase, UpdatePhase::BackingOff);
        assert_eq!(backing_off.status(6_000).phase, UpdatePhase::Idle);
    }

    #[test]
    fn a_new_retry_generation_or_another_target_forgets_failures() {
        let mut state = UpdateState {
            failures: Some(record("2.0", true, 0)),
            retry_generation: 1,
            ..UpdateState::default()
        };
        state.apply_desired(&desired(Some("2.0"), 1));
        assert!(
            state.failures.is_some(),
            "same target, same generation: still held"
        );
        state.apply_desired(&desired(Some("2.0"), 2));
        assert!(state.failures.is_none());
        assert_eq!(state.retry_generation, 2);

        state.failures = Some(record("2.0", true, 0));
        state.apply_desired(&desired(Some("3.0"), 2));
        assert!(state.failures.is_none());
    }

    #[test]
    fn attempt_numbers_survive_a_retry_and_are_kept_for_recent_releases() {
        let mut state = UpdateState {
            failures: Some(record("2.0", true, 0)),
            ..UpdateState::default()
        };
        assert_eq!(state.tries_of("2.0"), 3, "from the failure record");
        state.record_try("2.0", 3);
        state.apply_desired(&desired(Some("2.0"), 1));
        assert!(state.failures.is_none());
        assert_eq!(
            state.tries_of("2.0"),
            3,
            "a retry forgets failures, not attempts"
        );
        for n in 0..MAX_TRIED {
            state.record_try(&format!("r{n}"), 1);
        }
        assert_eq!(state.tried.len(), MAX_TRIED);
        assert_eq!(state.tries_of("2.0"), 0, "the oldest is forgotten first");
        state.record_try("r0", 2);
        assert_eq!(state.tried.last().unwrap().release, "r0");
        assert_eq!(state.tries_of("r0"), 2);
    }

    #[test]
    fn step_names_match_state_json() {
        let steps = [
            Step::Downloading,
            Step::ScriptRunning,
            Step::HealthChecking,
            Step::RollingBack {
                message: String::new(),
                output: String::new(),
            },
        ];
        for step in steps {
            let json = serde_json::to_value(&step).unwrap();
            assert_eq!(json["step"], step.name());
        }
    }

    #[test]
    fn the_store_persists_every_change() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let mut store = StateStore::open(&path).unwrap();
        assert_eq!(store.get(), &UpdateState::default());
        store
            .update(|s| {
                s.current = Some(Installed {
                    version: "1.0".into(),
                    module: Module::App,
                });
            })
            .unwrap();
        let again = StateStore::open(&path).unwrap();
        assert_eq!(again.get().current_version(), Some("1.0"));
    }
}
