//! The agent end to end: a real hub started in-process on `127.0.0.1:0` (SQLite always,
//! PostgreSQL when `DROVER_TEST_POSTGRES_URL` is set), real agents (in-process through
//! `drover_agent::run`, or the `drover-agent` binary where a test kills it), real files, real
//! sockets. Assertions look at both sides: what the device has installed (`current` symlink,
//! `state.json`, `drover-agent status`) and what the hub says about it (the management API).
//! Nothing waits on a fixed sleep: every wait is on a condition (`wait_until`).
//!
//! - [`enrolment`]: accepted and pending devices, re-enrolment, revocation, poll timing;
//! - [`install`]: signed updates with the `script` and `app` modules, over plain HTTP and TLS;
//! - [`config`]: config-only changes (`config.json`, `[app] reload`);
//! - [`failures`]: wrong signature, wrong hash, failing `update.sh`, failing health check,
//!   held releases and operator retries;
//! - [`download`]: cut and resumed downloads, error answers, the downloader against the hub;
//! - [`offline`]: reports made offline, kept across a restart, delivered later in order;
//! - [`crash_recovery`]: the binary killed at every step of an update, ending consistent;
//! - [`telemetry`]: meters to the hub's store: simulated and Modbus meters, exactly once across
//!   kills, a hub restart and lost acknowledgements, a full spool, the monthly budget.

#![allow(clippy::unwrap_used, reason = "a panic is how a test fails")]

/// Runs each listed case (an `async fn(Engine)`) as a test on SQLite and on PostgreSQL; the
/// PostgreSQL variant returns at once when no server is configured.
macro_rules! both_engines {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $case() {
                    super::$case(drover_test_support::Engine::Sqlite).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $case() {
                    super::$case(drover_test_support::Engine::Postgres).await;
                }
            )*
        }
    };
}

mod common;

mod config;
mod crash_recovery;
mod download;
mod enrolment;
mod failures;
mod install;
mod offline;
mod telemetry;

#[allow(dead_code, reason = "shared with the meter tests, which use all of it")]
#[path = "../meters/gateway.rs"]
mod gateway;
