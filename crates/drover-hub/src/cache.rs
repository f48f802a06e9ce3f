//! The check-in fast path: what the hub keeps in memory so that a check-in with nothing new is
//! answered without touching the database.
//!
//! A fleet polls constantly (a million devices at one poll a minute is 17,000 check-ins a
//! second), and nearly every check-in says "same as before". For those the hub needs only:
//! which device a credential belongs to, the etag of the state it should be in, and what it
//! reported last time. [`DeviceCache`] keeps exactly that. Last-seen times go to a
//! [`PresenceBuffer`] that a background task writes to the database in one transaction every
//! few seconds.
//!
//! Invalidation: a change to one device (accept, revoke, config, pin, retry) removes its entry;
//! a change to a fleet (target, config, poll interval) bumps the fleet's generation, and entries
//! built under an older generation are rebuilt on their next check-in. Every change also bumps
//! a global epoch; an entry built from the database is only inserted if the epoch did not move
//! while it was being built, so a build racing a change can never cache the state from before
//! the change. When several hub replicas run, the same invalidations will travel between them
//! over the message bus; the cache itself does not change.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use drover_protocol::device::DesiredState;
use drover_protocol::ids::DeviceId;

use crate::store::{Presence, Reported};

/// What the cache holds for one device.
#[derive(Debug)]
pub struct CachedDevice {
    /// The device.
    pub id: DeviceId,
    /// Its organization.
    pub org_id: i64,
    /// Its fleet.
    pub fleet_id: i64,
    /// The fleet generation this entry was built under.
    pub fleet_generation: u64,
    /// The state it should be in.
    pub desired: DesiredState,
    /// `desired` serialized, ready to send.
    pub desired_json: axum::body::Bytes,
    /// What it reported last (as stored in the database).
    pub reported: Mutex<Reported>,
    /// The facts it reported last, minus uptime, as a hash.
    pub facts_hash: Mutex<Option<u64>>,
    /// The telemetry status it reported last.
    pub telemetry: Mutex<Option<drover_protocol::device::TelemetryStatus>>,
}

#[derive(Default)]
struct Inner {
    /// Credential hash → device.
    tokens: HashMap<String, Arc<CachedDevice>>,
    /// Device → credential hash, to find the entry when a device changes.
    by_device: HashMap<DeviceId, String>,
    /// Fleet → generation.
    fleet_generations: HashMap<i64, u64>,
}

/// Devices by credential, for the check-in fast path.
#[derive(Default)]
pub struct DeviceCache {
    inner: RwLock<Inner>,
    epoch: AtomicU64,
}

impl std::fmt::Debug for DeviceCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceCache")
            .field("epoch", &self.epoch.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// Taken before reading a device's state from the database, to detect a change racing the read.
#[derive(Debug, Clone, Copy)]
pub struct BuildTicket {
    epoch: u64,
}

impl DeviceCache {
    /// The entry for a credential hash, if present and not stale.
    pub fn get(&self, credential_hash: &str) -> Option<Arc<CachedDevice>> {
        let inner = self.inner.read().unwrap_or_else(|p| p.into_inner());
        let entry = inner.tokens.get(credential_hash)?;
        let generation = inner
            .fleet_generations
            .get(&entry.fleet_id)
            .copied()
            .unwrap_or(0);
        (entry.fleet_generation == generation).then(|| Arc::clone(entry))
    }

    /// Call before reading a device's state from the database.
    pub fn ticket(&self) -> BuildTicket {
        BuildTicket {
            epoch: self.epoch.load(Ordering::SeqCst),
        }
    }

    /// Makes an entry (`make` gets the fleet's current generation) and caches it, unless
    /// something changed since `ticket` was taken; then the entry serves this one answer only
    /// and the next check-in rebuilds it.
    pub fn insert_with(
        &self,
        credential_hash: String,
        ticket: BuildTicket,
        fleet_id: i64,
        make: impl FnOnce(u64) -> CachedDevice,
    ) -> Arc<CachedDevice> {
        let mut inner = self.inner.write().unwrap_or_else(|p| p.into_inner());
        let generation = inner.fleet_generations.get(&fleet_id).copied().unwrap_or(0);
        let entry = Arc::new(make(generation));
        if self.epoch.load(Ordering::SeqCst) != ticket.epoch {
            return entry;
        }
        if let Some(old) = inner
            .by_device
            .insert(entry.id.clone(), credential_hash.clone())
        {
            inner.tokens.remove(&old);
        }
        inner.tokens.insert(credential_hash, Arc::clone(&entry));
        entry
    }

    /// Forgets a device (after any change to it, including a new credential or revocation).
    pub fn invalidate_device(&self, id: &DeviceId) {
        let mut inner = self.inner.write().unwrap_or_else(|p| p.into_inner());
        self.epoch.fetch_add(1, Ordering::SeqCst);
        if let Some(hash) = inner.by_device.remove(id) {
            inner.tokens.remove(&hash);
        }
    }

    /// Marks every entry of a fleet stale (after any change to the fleet or its targets).
    pub fn invalidate_fleet(&self, fleet_id: i64) {
        let mut inner = self.inner.write().unwrap_or_else(|p| p.into_inner());
        self.epoch.fetch_add(1, Ordering::SeqCst);
        *inner.fleet_generations.entry(fleet_id).or_insert(0) += 1;
    }

    /// How many devices are cached.
    pub fn len(&self) -> usize {
        self.inner
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .tokens
            .len()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Last-seen times waiting to be written.
///
/// A batch being written stays readable (`in_flight`) until the write has committed, so that an
/// operator asking in between never sees a device's last-seen time go back.
#[derive(Debug, Default)]
pub struct PresenceBuffer {
    inner: Mutex<PresenceInner>,
}

#[derive(Debug, Default)]
struct PresenceInner {
    pending: HashMap<DeviceId, Presence>,
    in_flight: HashMap<DeviceId, Presence>,
}

fn merge_presence(into: &mut HashMap<DeviceId, Presence>, id: DeviceId, presence: Presence) {
    match into.get_mut(&id) {
        Some(existing) => {
            existing.at = existing.at.max(presence.at);
            if presence.remote_ip.is_some() {
                existing.remote_ip = presence.remote_ip;
            }
            if presence.uptime_s.is_some() {
                existing.uptime_s = presence.uptime_s;
            }
        }
        None => {
            into.insert(id, presence);
        }
    }
}

impl PresenceBuffer {
    fn lock(&self) -> std::sync::MutexGuard<'_, PresenceInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Notes that a device checked in.
    pub fn record(&self, id: &DeviceId, presence: Presence) {
        merge_presence(&mut self.lock().pending, id.clone(), presence);
    }

    /// Takes everything recorded so far for writing; it stays visible to [`peek`] until
    /// [`written`] or [`restore`] is called.
    ///
    /// [`peek`]: PresenceBuffer::peek
    /// [`written`]: PresenceBuffer::written
    /// [`restore`]: PresenceBuffer::restore
    pub fn drain(&self) -> Vec<(DeviceId, Presence)> {
        let mut inner = self.lock();
        let batch = std::mem::take(&mut inner.pending);
        inner.in_flight.clone_from(&batch);
        batch.into_iter().collect()
    }

    /// The drained batch is in the database.
    pub fn written(&self) {
        self.lock().in_flight.clear();
    }

    /// The drained batch could not be written: put it back, keeping newer entries recorded
    /// meanwhile.
    pub fn restore(&self) {
        let mut inner = self.lock();
        let in_flight = std::mem::take(&mut inner.in_flight);
        for (id, presence) in in_flight {
            merge_presence(&mut inner.pending, id, presence);
        }
    }

    /// The latest recorded presence of a device not yet in the database, if any.
    pub fn peek(&self, id: &DeviceId) -> Option<Presence> {
        let inner = self.lock();
        match (inner.pending.get(id), inner.in_flight.get(id)) {
            (Some(p), Some(f)) => {
                let mut merged = f.clone();
                merged.at = merged.at.max(p.at);
                if p.remote_ip.is_some() {
                    merged.remote_ip.clone_from(&p.remote_ip);
                }
                if p.uptime_s.is_some() {
                    merged.uptime_s = p.uptime_s;
                }
                Some(merged)
            }
            (Some(p), None) => Some(p.clone()),
            (None, f) => f.cloned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_protocol::device::UpdateStatus;

    fn entry(id: &str, fleet_id: i64, generation: u64) -> CachedDevice {
        CachedDevice {
            id: DeviceId::parse(id).unwrap(),
            org_id: 1,
            fleet_id,
            fleet_generation: generation,
            desired: DesiredState {
                etag: "e".into(),
                poll_interval_s: 60,
                release: None,
                config: serde_json::json!({}),
                retry_generation: 0,
            },
            desired_json: axum::body::Bytes::new(),
            reported: Mutex::new(Reported {
                current_release: None,
                agent_version: "1".into(),
                update: UpdateStatus::idle(),
            }),
            facts_hash: Mutex::new(None),
            telemetry: Mutex::new(None),
        }
    }

    #[test]
    fn fleet_changes_make_entries_stale() {
        let cache = DeviceCache::default();
        let ticket = cache.ticket();
        cache.insert_with("h1".into(), ticket, 7, |g| entry("d1", 7, g));
        assert!(cache.get("h1").is_some());
        cache.invalidate_fleet(7);
        assert!(cache.get("h1").is_none());
        cache.invalidate_fleet(8);
    }

    #[test]
    fn a_build_racing_a_change_is_not_cached() {
        let cache = DeviceCache::default();
        let ticket = cache.ticket();
        cache.invalidate_device(&DeviceId::parse("d1").unwrap());
        cache.insert_with("h1".into(), ticket, 7, |g| entry("d1", 7, g));
        assert!(cache.get("h1").is_none());
    }

    #[test]
    fn a_new_credential_replaces_the_old_entry() {
        let cache = DeviceCache::default();
        cache.insert_with("old".into(), cache.ticket(), 7, |g| entry("d1", 7, g));
        cache.insert_with("new".into(), cache.ticket(), 7, |g| entry("d1", 7, g));
        assert!(cache.get("old").is_none());
        assert!(cache.get("new").is_some());
        cache.invalidate_device(&DeviceId::parse("d1").unwrap());
        assert!(cache.is_empty());
    }

    #[test]
    fn presence_keeps_the_latest() {
        let buf = PresenceBuffer::default();
        let id = DeviceId::parse("d1").unwrap();
        buf.record(
            &id,
            Presence {
                at: 5,
                remote_ip: Some("1.2.3.4".into()),
                uptime_s: None,
            },
        );
        buf.record(
            &id,
            Presence {
                at: 3,
                remote_ip: None,
                uptime_s: Some(9),
            },
        );
        let drained = buf.drain();
        assert_eq!(
            drained,
            vec![(
                id,
                Presence {
                    at: 5,
                    remote_ip: Some("1.2.3.4".into()),
                    uptime_s: Some(9)
                }
            )]
        );
        assert!(buf.drain().is_empty());
    }
}
