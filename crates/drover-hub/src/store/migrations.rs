//! Versioned schema migrations, one list for both engines.
//!
//! Each migration has its SQL written for SQLite and for PostgreSQL, since the two disagree on
//! little more than how an auto-increment key is spelled. Applied migrations are recorded in
//! `schema_migrations`; a hub refuses to start against a database newer than itself, so an old
//! binary never writes into a schema it does not understand. On PostgreSQL the whole run holds
//! an advisory lock, so several hub replicas starting at once migrate exactly once.
//!
//! Conventions every migration keeps (so that one set of queries serves both engines):
//! - every integer is `BIGINT` (SQLite: `INTEGER`), decoded as `i64`;
//! - flags are `BIGINT` 0/1, times are Unix milliseconds, JSON is `TEXT`;
//! - every table but `organizations` and `schema_migrations` has an `org_id`.

/// One schema change.
pub struct Migration {
    /// Increasing from 1, never reused.
    pub version: i64,
    /// A few words on what it does.
    pub name: &'static str,
    /// The statements, with `{pk}` where an auto-increment primary key is declared and
    /// `{blob}` for a binary column.
    pub template: &'static str,
}

impl Migration {
    /// The statements for one engine.
    pub fn sql(&self, engine: super::Engine) -> String {
        let (pk, blob) = match engine {
            super::Engine::Sqlite => ("INTEGER PRIMARY KEY", "BLOB"),
            super::Engine::Postgres => ("BIGSERIAL PRIMARY KEY", "BYTEA"),
        };
        self.template.replace("{pk}", pk).replace("{blob}", blob)
    }
}

/// Every migration, oldest first.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "organizations, fleets, devices, releases, update attempts, tokens",
        template: INITIAL,
    },
    Migration {
        version: 2,
        name: "data cloud: sites, series, chunks, rollups, flags, reports",
        template: DATA_CLOUD,
    },
    Migration {
        version: 3,
        name: "devices report their telemetry status",
        template: "ALTER TABLE devices ADD COLUMN telemetry TEXT;",
    },
    Migration {
        version: 4,
        name: "chunk and rollup rows count the pieces appended to them",
        template: "ALTER TABLE chunks ADD COLUMN blocks BIGINT NOT NULL DEFAULT 1;
                   ALTER TABLE rollups ADD COLUMN blocks BIGINT NOT NULL DEFAULT 1;",
    },
    Migration {
        version: 5,
        name: "batches land durably before they are folded into chunks and rollups",
        template: LANDED_BATCHES,
    },
    Migration {
        version: 6,
        name: "devices keep the history of their sites, for reports",
        template: SITE_ASSIGNMENTS,
    },
    Migration {
        version: 7,
        name: "devices count readings of numbered batches that were stored already",
        template: "ALTER TABLE devices ADD COLUMN duplicate_points BIGINT NOT NULL DEFAULT 0;",
    },
];

/// Every change of a device's site, from when it holds (see `store::sites`). A device's
/// current site stays in `devices.site_id`; reports read the history, so a box that moved or
/// was replaced counts for each site while it was there. Devices already at a site are taken
/// to have been there from the beginning.
const SITE_ASSIGNMENTS: &str = r#"
CREATE TABLE site_assignments (
    id {pk},
    org_id BIGINT NOT NULL REFERENCES organizations(id),
    device_id TEXT NOT NULL REFERENCES devices(id),
    site_id BIGINT REFERENCES sites(id),
    valid_from BIGINT NOT NULL
);
CREATE INDEX site_assignments_device ON site_assignments (org_id, device_id, valid_from);
CREATE INDEX site_assignments_site ON site_assignments (org_id, site_id);
INSERT INTO site_assignments (org_id, device_id, site_id, valid_from)
    SELECT org_id, id, site_id, 0 FROM devices WHERE site_id IS NOT NULL;
"#;

/// Acknowledged batches not yet folded into chunks and rollups (see `store::ingest`). No
/// foreign keys: a row is written once per batch on the acknowledgement path, and its
/// organization and device were checked by the bridge (devices are never deleted).
const LANDED_BATCHES: &str = r#"
CREATE TABLE landed_batches (
    id {pk},
    org_id BIGINT NOT NULL,
    device_id TEXT NOT NULL,
    seq BIGINT,
    landed_at BIGINT NOT NULL,
    body {blob} NOT NULL,
    error TEXT
);
"#;

/// The initial schema, with `{pk}` standing for the engine's auto-increment primary key.
const INITIAL: &str = r#"
CREATE TABLE organizations (
    id {pk},
    name TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL
);

CREATE TABLE api_tokens (
    id {pk},
    org_id BIGINT NOT NULL REFERENCES organizations(id),
    name TEXT NOT NULL,
    token_hash TEXT NOT NULL UNIQUE,
    role TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    revoked_at BIGINT
);

CREATE TABLE fleets (
    id {pk},
    org_id BIGINT NOT NULL REFERENCES organizations(id),
    name TEXT NOT NULL,
    auto_accept BIGINT NOT NULL,
    provisioning_key_hash TEXT NOT NULL UNIQUE,
    release_key TEXT,
    poll_interval_s BIGINT NOT NULL,
    config TEXT NOT NULL,
    seed_secret TEXT UNIQUE,
    deploy_generation BIGINT NOT NULL,
    next_release_seq BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    UNIQUE (org_id, name)
);

CREATE TABLE device_types (
    org_id BIGINT NOT NULL REFERENCES organizations(id),
    name TEXT NOT NULL,
    arch TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (org_id, name)
);

CREATE TABLE artifacts (
    org_id BIGINT NOT NULL REFERENCES organizations(id),
    sha256 TEXT NOT NULL,
    size BIGINT NOT NULL,
    format TEXT,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (org_id, sha256)
);

CREATE TABLE releases (
    id {pk},
    org_id BIGINT NOT NULL REFERENCES organizations(id),
    fleet_id BIGINT NOT NULL REFERENCES fleets(id),
    seq BIGINT NOT NULL,
    version TEXT NOT NULL,
    device_type TEXT,
    module TEXT NOT NULL,
    artifact_sha256 TEXT NOT NULL,
    artifact_size BIGINT NOT NULL,
    artifact_format TEXT NOT NULL,
    signature TEXT,
    notes TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    UNIQUE (fleet_id, version),
    UNIQUE (fleet_id, seq)
);
CREATE INDEX releases_artifact ON releases (org_id, artifact_sha256);

CREATE TABLE fleet_targets (
    fleet_id BIGINT NOT NULL REFERENCES fleets(id),
    device_type TEXT NOT NULL,
    org_id BIGINT NOT NULL REFERENCES organizations(id),
    release_id BIGINT NOT NULL REFERENCES releases(id),
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (fleet_id, device_type)
);

CREATE TABLE devices (
    id TEXT PRIMARY KEY,
    org_id BIGINT NOT NULL REFERENCES organizations(id),
    fleet_id BIGINT NOT NULL REFERENCES fleets(id),
    device_type TEXT NOT NULL,
    status TEXT NOT NULL,
    protocol TEXT NOT NULL,
    public_key TEXT UNIQUE,
    credential_hash TEXT UNIQUE,
    agent_version TEXT NOT NULL,
    current_release TEXT,
    seed_snapshot BIGINT,
    update_phase TEXT NOT NULL,
    update_release TEXT,
    update_failures BIGINT NOT NULL,
    update_message TEXT,
    os TEXT NOT NULL,
    arch TEXT NOT NULL,
    hostname TEXT NOT NULL,
    ip TEXT,
    remote_ip TEXT,
    uptime_s BIGINT NOT NULL,
    tags TEXT NOT NULL,
    attributes TEXT NOT NULL,
    config TEXT NOT NULL,
    pinned_release_id BIGINT REFERENCES releases(id),
    retry_generation BIGINT NOT NULL,
    retry_requested_at BIGINT,
    last_report_seq BIGINT NOT NULL,
    last_seen BIGINT,
    created_at BIGINT NOT NULL,
    accepted_at BIGINT,
    revoked_at BIGINT
);
CREATE INDEX devices_fleet ON devices (org_id, fleet_id);

CREATE TABLE update_attempts (
    id {pk},
    org_id BIGINT NOT NULL REFERENCES organizations(id),
    device_id TEXT NOT NULL REFERENCES devices(id),
    release_version TEXT NOT NULL,
    attempt BIGINT NOT NULL,
    state TEXT NOT NULL,
    message TEXT,
    output TEXT,
    started_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    UNIQUE (device_id, release_version, attempt)
);

CREATE TABLE attempt_events (
    id {pk},
    org_id BIGINT NOT NULL REFERENCES organizations(id),
    attempt_id BIGINT NOT NULL REFERENCES update_attempts(id),
    state TEXT NOT NULL,
    message TEXT,
    at BIGINT NOT NULL,
    received_at BIGINT NOT NULL
);
CREATE INDEX attempt_events_attempt ON attempt_events (attempt_id);
"#;

/// The data cloud: sites, series of readings stored as compressed chunks (one row per series
/// per window), rollups stored the same way, plausibility flags, and energy reports.
const DATA_CLOUD: &str = r#"
CREATE TABLE sites (
    id {pk},
    org_id BIGINT NOT NULL REFERENCES organizations(id),
    name TEXT NOT NULL,
    address TEXT NOT NULL,
    customer TEXT NOT NULL,
    reporting_start BIGINT,
    created_at BIGINT NOT NULL,
    UNIQUE (org_id, name)
);
CREATE INDEX sites_customer ON sites (org_id, customer);

ALTER TABLE devices ADD COLUMN site_id BIGINT REFERENCES sites(id);
ALTER TABLE devices ADD COLUMN last_batch_seq BIGINT NOT NULL DEFAULT 0;
ALTER TABLE devices ADD COLUMN spool_dropped BIGINT NOT NULL DEFAULT 0;
ALTER TABLE devices ADD COLUMN telemetry_bytes BIGINT NOT NULL DEFAULT 0;

CREATE TABLE series (
    id {pk},
    org_id BIGINT NOT NULL REFERENCES organizations(id),
    device_id TEXT NOT NULL REFERENCES devices(id),
    meter TEXT NOT NULL,
    channel TEXT NOT NULL,
    unit TEXT NOT NULL,
    scale BIGINT NOT NULL,
    first_ts BIGINT,
    last_ts BIGINT,
    last_value BIGINT,
    points BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    UNIQUE (device_id, meter, channel)
);
CREATE INDEX series_org ON series (org_id, device_id);

CREATE TABLE chunks (
    series_id BIGINT NOT NULL REFERENCES series(id),
    window_start BIGINT NOT NULL,
    org_id BIGINT NOT NULL REFERENCES organizations(id),
    points BIGINT NOT NULL,
    first_ts BIGINT NOT NULL,
    last_ts BIGINT NOT NULL,
    data {blob} NOT NULL,
    PRIMARY KEY (series_id, window_start)
);

CREATE TABLE rollups (
    series_id BIGINT NOT NULL REFERENCES series(id),
    resolution TEXT NOT NULL,
    window_start BIGINT NOT NULL,
    org_id BIGINT NOT NULL REFERENCES organizations(id),
    data {blob} NOT NULL,
    PRIMARY KEY (series_id, resolution, window_start)
);

CREATE TABLE telemetry_flags (
    id {pk},
    org_id BIGINT NOT NULL REFERENCES organizations(id),
    series_id BIGINT NOT NULL REFERENCES series(id),
    kind TEXT NOT NULL,
    from_ts BIGINT NOT NULL,
    to_ts BIGINT NOT NULL,
    from_value BIGINT NOT NULL,
    to_value BIGINT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX telemetry_flags_series ON telemetry_flags (series_id, to_ts);

CREATE TABLE reports (
    id {pk},
    org_id BIGINT NOT NULL REFERENCES organizations(id),
    scope TEXT NOT NULL,
    subject TEXT NOT NULL,
    period_start BIGINT NOT NULL,
    period_end BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    frozen_at BIGINT,
    content TEXT,
    sha256 TEXT
);
CREATE INDEX reports_org ON reports (org_id, created_at);
"#;
