//! `drover-agent status`: what the state directory says about this device, read without
//! disturbing a running agent (every file is replaced atomically, so reading is safe).

use std::fmt;
use std::path::Path;

use drover_protocol::device::{DesiredState, UpdatePhase, UpdateStatus};

use crate::fsutil::{self, FileError};
use crate::layout::{DeviceRecord, StateDir};
use crate::outbox::{self, now_ms};
use crate::sender::budget;
use crate::sender::state::SenderState;
use crate::update::state::UpdateState;

/// A device's standing, from its state directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentStatus {
    /// The device ID, once enrolled.
    pub device_id: Option<String>,
    /// The fleet, once enrolled.
    pub fleet: Option<String>,
    /// Whether a credential is stored.
    pub has_credential: bool,
    /// The committed release.
    pub current_release: Option<String>,
    /// The release the hub last asked for.
    pub target_release: Option<String>,
    /// The update machinery's state, as the next check-in will report it.
    pub update: UpdateStatus,
    /// The step of the attempt in progress, if any.
    pub step: Option<String>,
    /// Reports waiting for delivery.
    pub pending_reports: usize,
    /// The sender's state, once telemetry has run.
    pub telemetry: Option<SenderState>,
}

/// Reads the status from a state directory.
pub fn status(state_dir: &Path) -> Result<AgentStatus, FileError> {
    let paths = StateDir::new(state_dir);
    let device = DeviceRecord::load(&paths)?;
    let state: UpdateState = fsutil::read_json(&paths.state_json())?.unwrap_or_default();
    let desired: Option<DesiredState> = fsutil::read_json(&paths.desired_json())?;
    Ok(AgentStatus {
        device_id: device.as_ref().map(|d| d.device_id.to_string()),
        fleet: device.as_ref().map(|d| d.fleet.clone()),
        has_credential: paths.credential().exists(),
        current_release: state.current_version().map(str::to_string),
        target_release: desired.and_then(|d| d.release).map(|r| r.version),
        update: state.status(now_ms()),
        step: state.attempt.as_ref().map(|a| a.step.name().to_string()),
        pending_reports: outbox::count(&paths.outbox_dir())?,
        telemetry: fsutil::read_json(&paths.telemetry_json())?,
    })
}

impl fmt::Display for AgentStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let or_none = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
        let enrolled = match (&self.device_id, self.has_credential) {
            (Some(_), true) => "enrolled",
            (Some(_), false) => "enrolled, credential missing (will enrol again)",
            (None, _) => "not enrolled",
        };
        writeln!(
            f,
            "device:           {} ({enrolled})",
            or_none(&self.device_id)
        )?;
        writeln!(f, "fleet:            {}", or_none(&self.fleet))?;
        writeln!(f, "current release:  {}", or_none(&self.current_release))?;
        writeln!(f, "target release:   {}", or_none(&self.target_release))?;
        let mut phase = self.update.phase.as_str().to_string();
        if let Some(release) = &self.update.release {
            phase.push_str(&format!(" ({release}"));
            if self.update.failures > 0 {
                phase.push_str(&format!(", {} failed attempts", self.update.failures));
            }
            if let Some(step) = &self.step {
                phase.push_str(&format!(", step {step}"));
            }
            phase.push(')');
        }
        writeln!(f, "update:           {phase}")?;
        if let Some(message) = &self.update.message
            && self.update.phase != UpdatePhase::Idle
        {
            writeln!(f, "last error:       {message}")?;
        }
        write!(f, "reports waiting:  {}", self.pending_reports)?;
        if let Some(t) = &self.telemetry {
            let in_flight = t
                .inflight
                .map(|b| format!(", batch {} in flight ({} readings)", b.seq, b.readings))
                .unwrap_or_default();
            write!(
                f,
                "\ntelemetry:        {} batches sent{in_flight}, {} bytes this month, {} readings refused by the hub",
                t.next_seq
                    .saturating_sub(1)
                    .saturating_sub(u64::from(t.inflight.is_some())),
                t.bytes_in(budget::month_of(now_ms())),
                t.refused_readings
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_state_dir_reads_as_a_fresh_device() {
        let dir = tempfile::tempdir().unwrap();
        let status = status(dir.path()).unwrap();
        assert_eq!(status.device_id, None);
        assert_eq!(status.update.phase, UpdatePhase::Idle);
        let text = status.to_string();
        assert!(text.contains("not enrolled"), "{text}");
        assert!(text.contains("current release:  -"), "{text}");
    }
}
