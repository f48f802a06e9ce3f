//! The time a reading is stamped with, and how far that time can be trusted ([`ClockState`]).
//!
//! A Raspberry Pi has no real-time clock: after a power cut it boots with the time it last
//! saved (or 1970) and jumps once it reaches a time server. The seed stamped readings with that
//! clock and never said whether it had been set (seed weakness 19). Every reading here carries a
//! [`ClockState`], decided by [`SystemClock`] without `unsafe` (no `adjtimex`):
//!
//! 1. `/run/systemd/timesync/synchronized` exists → **synced**. systemd-timesyncd creates it
//!    when it first synchronises the clock; `/run` is a tmpfs, so the file means "synchronised
//!    since this boot", which is what [`ClockState::Synced`] promises.
//! 2. The clock reads earlier than [`PLAUSIBLE_SINCE_MS`] → **unsynced**: no reading of this
//!    agent can really have been taken before it was written.
//! 3. `/run/systemd/timesync/` exists without the flag → **unsynced**: timesyncd runs (the
//!    directory is its runtime directory) but has not reached a server yet.
//! 4. Otherwise (chrony, ntpd, no time daemon at all) → **unknown**.
//!
//! Tests inject their own [`Clock`].

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use drover_protocol::reading::ClockState;

/// The flag systemd-timesyncd creates once it has synchronised the clock.
pub const TIMESYNC_FLAG: &str = "/run/systemd/timesync/synchronized";

/// 2025-01-01T00:00:00Z. A clock that reads earlier than this has not been set since boot.
pub const PLAUSIBLE_SINCE_MS: i64 = 1_735_689_600_000;

/// Where readings get their time and clock state.
pub trait Clock: Send + Sync + fmt::Debug {
    /// Now, in Unix milliseconds, by the device's clock.
    fn now_ms(&self) -> i64;
    /// How far [`Clock::now_ms`] can be trusted at the moment.
    fn state(&self) -> ClockState;
}

/// The system clock, with its state detected as the module documentation describes.
#[derive(Debug, Clone)]
pub struct SystemClock {
    flag: PathBuf,
}

impl SystemClock {
    /// The system clock, trusting systemd-timesyncd's flag at [`TIMESYNC_FLAG`].
    pub fn new() -> SystemClock {
        SystemClock::with_flag(TIMESYNC_FLAG)
    }

    /// The system clock, with the synchronisation flag somewhere else (tests, other daemons
    /// that can be made to touch a file).
    pub fn with_flag(flag: impl Into<PathBuf>) -> SystemClock {
        SystemClock { flag: flag.into() }
    }
}

impl Default for SystemClock {
    fn default() -> SystemClock {
        SystemClock::new()
    }
}

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        system_now_ms()
    }

    fn state(&self) -> ClockState {
        detect(&self.flag, self.now_ms())
    }
}

/// The system time in Unix milliseconds (negative before 1970, which a broken clock can show).
pub fn system_now_ms() -> i64 {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        Err(e) => i64::try_from(e.duration().as_millis()).map_or(i64::MIN, |ms| -ms),
    }
}

/// The decision of the module documentation, for a flag path and a time.
fn detect(flag: &Path, now_ms: i64) -> ClockState {
    if flag.exists() {
        return ClockState::Synced;
    }
    if now_ms < PLAUSIBLE_SINCE_MS {
        return ClockState::Unsynced;
    }
    match flag.parent() {
        Some(dir) if dir.is_dir() => ClockState::Unsynced,
        _ => ClockState::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flag_the_time_and_the_daemon_decide_the_state() {
        let dir = tempfile::tempdir().unwrap();
        let timesync = dir.path().join("timesync");
        let flag = timesync.join("synchronized");
        let now = PLAUSIBLE_SINCE_MS + 1;
        // No time daemon that we know of.
        assert_eq!(detect(&flag, now), ClockState::Unknown);
        assert_eq!(detect(&flag, 0), ClockState::Unsynced);
        // timesyncd runs but has not synchronised yet.
        std::fs::create_dir(&timesync).unwrap();
        assert_eq!(detect(&flag, now), ClockState::Unsynced);
        std::fs::write(&flag, b"").unwrap();
        assert_eq!(detect(&flag, now), ClockState::Synced);
        let clock = SystemClock::with_flag(&flag);
        assert_eq!(clock.state(), ClockState::Synced);
        assert!(clock.now_ms() > PLAUSIBLE_SINCE_MS);
    }
}
