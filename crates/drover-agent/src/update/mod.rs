//! The update machinery: deciding what to do about the desired release ([`plan`]), the state
//! machine persisted in `state.json` ([`state`]), and the task that walks an attempt through its
//! steps and resumes it after a crash ([`runner`]).
//!
//! The failure policy lives here too. Per target release, failures count up; the next attempt
//! waits `retry.base * 2^(failures-1)` (capped at `retry.max_backoff`, persisted so a restart does
//! not skip it); after `retry.max_failures` the release is held, reported once as `held`, and not
//! tried again until the hub raises `retry_generation` or targets another release.

pub mod runner;
pub mod state;

#[cfg(test)]
mod runner_tests;

use drover_protocol::device::DesiredState;

use crate::update::state::{Attempt, Step, UpdateState};

/// What the agent should do about updates right now.
#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    /// Nothing to install.
    Nothing,
    /// An attempt is in progress (perhaps cut short by a crash): continue it.
    Resume,
    /// The attempt in progress is still downloading a release that is no longer the target:
    /// drop it (nothing was installed, and nothing counts as failed).
    Discard,
    /// Begin this attempt.
    Start(Box<Attempt>),
    /// The target release failed recently: not before this time (Unix ms).
    WaitUntil(i64),
    /// The target release is held until an operator acts.
    Held,
}

/// Decides what to do from the persisted state and the last desired state. `desired` is `None`
/// when the hub has never answered (a fresh device offline): an attempt in progress is still
/// resumed, so an interrupted install is finished or rolled back without the hub.
pub fn plan(state: &UpdateState, desired: Option<&DesiredState>, now_ms: i64) -> Plan {
    if let Some(attempt) = &state.attempt {
        let superseded = desired.is_some_and(|d| d.release.as_ref() != Some(&attempt.offer));
        if superseded && attempt.step == Step::Downloading {
            return Plan::Discard;
        }
        return Plan::Resume;
    }
    let Some(desired) = desired else {
        return Plan::Nothing;
    };
    let Some(offer) = &desired.release else {
        return Plan::Nothing;
    };
    if state.current_version() == Some(offer.version.as_str()) {
        return Plan::Nothing;
    }
    let failures = state.failures_of(&offer.version);
    if let Some(record) = failures {
        if record.held {
            return Plan::Held;
        }
        if record.retry_at_ms > now_ms {
            return Plan::WaitUntil(record.retry_at_ms);
        }
    }
    Plan::Start(Box::new(Attempt {
        offer: offer.clone(),
        config: desired.config.clone(),
        number: state.tries_of(&offer.version) + 1,
        old_app: None,
        step: Step::Downloading,
    }))
}

#[cfg(test)]
mod tests {
    use drover_protocol::device::{Module, ReleaseOffer};

    use super::*;
    use crate::update::state::{FailureRecord, Installed};

    fn offer(version: &str) -> ReleaseOffer {
        ReleaseOffer {
            version: version.into(),
            module: Module::App,
            device_type: None,
            artifact_url: "/a".into(),
            size: 1,
            sha256: "0".repeat(64),
            signature: String::new(),
        }
    }

    fn desired(version: Option<&str>) -> DesiredState {
        DesiredState {
            etag: "e".into(),
            poll_interval_s: 10,
            release: version.map(offer),
            config: serde_json::json!({"k": "v"}),
            retry_generation: 0,
        }
    }

    fn attempt(version: &str, step: Step) -> Attempt {
        Attempt {
            offer: offer(version),
            config: serde_json::Value::Null,
            number: 1,
            old_app: None,
            step,
        }
    }

    #[test]
    fn starts_when_the_target_differs_from_current() {
        let state = UpdateState {
            current: Some(Installed {
                version: "1".into(),
                module: Module::App,
            }),
            ..UpdateState::default()
        };
        assert_eq!(plan(&state, Some(&desired(Some("1"))), 0), Plan::Nothing);
        assert_eq!(plan(&state, Some(&desired(None)), 0), Plan::Nothing);
        assert_eq!(plan(&state, None, 0), Plan::Nothing);
        let Plan::Start(attempt) = plan(&state, Some(&desired(Some("2"))), 0) else {
            panic!("should start");
        };
        assert_eq!(attempt.number, 1);
        assert_eq!(attempt.step, Step::Downloading);
        assert_eq!(attempt.config, serde_json::json!({"k": "v"}));
    }

    #[test]
    fn failures_back_off_then_hold() {
        let mut state = UpdateState {
            failures: Some(FailureRecord {
                release: "2".into(),
                failures: 2,
                retry_at_ms: 5_000,
                held: false,
                last_error: "boom".into(),
            }),
            ..UpdateState::default()
        };
        let d = desired(Some("2"));
        assert_eq!(plan(&state, Some(&d), 1_000), Plan::WaitUntil(5_000));
        let Plan::Start(attempt) = plan(&state, Some(&d), 5_000) else {
            panic!("backoff elapsed");
        };
        assert_eq!(attempt.number, 3);
        if let Some(f) = state.failures.as_mut() {
            f.held = true;
        }
        assert_eq!(plan(&state, Some(&d), 10_000_000), Plan::Held);
    }

    #[test]
    fn attempts_resume_unless_a_download_was_superseded() {
        let mut state = UpdateState {
            attempt: Some(attempt("2", Step::Downloading)),
            ..UpdateState::default()
        };
        assert_eq!(plan(&state, Some(&desired(Some("2"))), 0), Plan::Resume);
        assert_eq!(
            plan(&state, None, 0),
            Plan::Resume,
            "offline after a restart"
        );
        assert_eq!(plan(&state, Some(&desired(Some("3"))), 0), Plan::Discard);
        assert_eq!(plan(&state, Some(&desired(None)), 0), Plan::Discard);
        // Once installing has begun, the attempt is finished whatever the hub now wants.
        state.attempt = Some(attempt("2", Step::HealthChecking));
        assert_eq!(plan(&state, Some(&desired(Some("3"))), 0), Plan::Resume);
    }
}
