//! The state directory: what lives where, and the small records kept in it.
//!
//! ```text
//! <state_dir>/
//!   identity.key        0600  the device's own ed25519 key (made once, never leaves the device)
//!   credential          0600  the bearer credential from enrolment
//!   device.json               device ID, fleet, and the release key trusted on first use
//!   desired.json              the last DesiredState from the hub (with its etag), so that a
//!                             restart while offline still knows the target
//!   config.json               the device's effective config from the hub (crate::device_config)
//!   state.json                the update state machine (crate::update::state)
//!   outbox/                   reports not yet acknowledged by the hub:
//!     <seq, 20 digits>.json     one UpdateReport per file
//!     next-seq                  the next sequence number, so none is ever reused
//!   spool/                    meter readings not yet acknowledged by the hub (crate::spool):
//!     <first record ID, 20 digits>.seg  append-only segment files of checksummed records
//!     state.json                the acknowledged cursor and the count of dropped readings
//!   telemetry.json            the sender's state (crate::sender): next batch sequence number,
//!                             the batch in flight, bytes used this month
//!   downloads/
//!     <sha256>.part             a download in progress (resumed with Range)
//!     <sha256>                  a download whose size, hash and signature were verified
//!   work/                     the script module's unpack area: <version>.partial -> <version>
//!   apps/                     apps_root for update scripts (unless configured elsewhere)
//!   app/                      the app module's root (unless configured elsewhere):
//!     releases/<version>/       complete releases only (unpacked as .<version>.partial first)
//!     current -> releases/<version>
//!   meters/                   meter state that must survive a restart (crate::meters):
//!     s0-<name>.json            an S0 input's pulse count
//!     sim-<name>.json           a simulated meter's register anchor
//! ```
//!
//! Every file here is written with [`crate::fsutil::write_atomic`], except the spool's segments,
//! which are append-only and checksummed record by record (see [`crate::spool`]).

use std::path::{Path, PathBuf};

use drover_protocol::ids::DeviceId;
use serde::{Deserialize, Serialize};

use crate::fsutil::{self, FileError};

/// Paths inside the state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    /// The layout under `root` (nothing is created).
    pub fn new(root: impl Into<PathBuf>) -> StateDir {
        StateDir { root: root.into() }
    }

    /// Creates the directory and its fixed subdirectories (0700: it holds secrets).
    pub fn create(&self) -> Result<(), FileError> {
        fsutil::create_dir_all(&self.root, 0o700)?;
        for dir in [self.outbox_dir(), self.downloads_dir(), self.work_dir()] {
            fsutil::create_dir_all(&dir, 0o700)?;
        }
        Ok(())
    }

    /// The state directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The device's identity key.
    pub fn identity_key(&self) -> PathBuf {
        self.root.join("identity.key")
    }

    /// The device credential.
    pub fn credential(&self) -> PathBuf {
        self.root.join("credential")
    }

    /// [`DeviceRecord`].
    pub fn device_json(&self) -> PathBuf {
        self.root.join("device.json")
    }

    /// The last desired state.
    pub fn desired_json(&self) -> PathBuf {
        self.root.join("desired.json")
    }

    /// The device's effective config, for apps and scripts (`DROVER_CONFIG_FILE`).
    pub fn config_json(&self) -> PathBuf {
        self.root.join("config.json")
    }

    /// The update state machine.
    pub fn state_json(&self) -> PathBuf {
        self.root.join("state.json")
    }

    /// Undelivered reports.
    pub fn outbox_dir(&self) -> PathBuf {
        self.root.join("outbox")
    }

    /// The spool of meter readings.
    pub fn spool_dir(&self) -> PathBuf {
        self.root.join("spool")
    }

    /// The sender's state: the next batch sequence number, the batch in flight, the month's
    /// bytes (crate::sender).
    pub fn telemetry_json(&self) -> PathBuf {
        self.root.join("telemetry.json")
    }

    /// Downloads, partial and verified.
    pub fn downloads_dir(&self) -> PathBuf {
        self.root.join("downloads")
    }

    /// The script module's unpack area.
    pub fn work_dir(&self) -> PathBuf {
        self.root.join("work")
    }

    /// Meter state (S0 counters, simulated registers); made by the sources that need it.
    pub fn meters_dir(&self) -> PathBuf {
        self.root.join("meters")
    }
}

/// What enrolment established, kept in `device.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    /// The device's ID.
    pub device_id: DeviceId,
    /// The fleet's name.
    pub fleet: String,
    /// The release key received at the first enrolment that carried one (trust on first use).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release_key: Option<String>,
}

impl DeviceRecord {
    /// Reads `device.json`, if the device has enrolled.
    pub fn load(dir: &StateDir) -> Result<Option<DeviceRecord>, FileError> {
        fsutil::read_json(&dir.device_json())
    }

    /// Writes `device.json`.
    pub fn save(&self, dir: &StateDir) -> Result<(), FileError> {
        fsutil::write_json_atomic(&dir.device_json(), self, fsutil::PUBLIC)
    }
}
