//! How fast the spool appends, and how much disk a reading takes, with the default `[spool]`
//! config: a Modbus-like meter's polls (energy, power, voltage: one record of 3 readings each)
//! appended as fast as they come, then the spool reopened (the recovery scan a restart does).
//!
//! ```sh
//! cargo run --release -p drover-agent --example spool_throughput [-- <directory>]
//! ```
//!
//! The directory (default: the system's temporary directory) should be on the disk to
//! measure: fsync on a tmpfs costs nothing.

#![allow(
    clippy::unwrap_used,
    reason = "a measuring script: a panic is a clear enough error"
)]

use std::time::Instant;

use drover_agent::config::SpoolConfig;
use drover_agent::spool::Spool;
use drover_protocol::reading::{Channel, ClockState, MeterId, Reading};

/// Polls to append: 3 million readings, below the default 64 MiB bound.
const POLLS: u64 = 1_000_000;

fn main() {
    let parent = std::env::args()
        .nth(1)
        .map_or_else(std::env::temp_dir, Into::into);
    let dir = tempfile::tempdir_in(parent).unwrap();
    let config = SpoolConfig::default();
    let meter = MeterId::parse("modbus-12345678").unwrap();
    let poll = |i: u64| {
        let ts_ms = 1_700_000_000_000 + i as i64 * 2000;
        let reading = |channel, value, scale| Reading {
            meter: meter.clone(),
            channel,
            ts_ms,
            value,
            scale,
            clock: ClockState::Synced,
        };
        [
            reading(Channel::EnergyImport, 12_345_678 + i as i64 / 3, 0),
            reading(Channel::Power, 1500 + (i % 200) as i64, 0),
            reading(Channel::VoltageL1, 2300 + (i % 7) as i64, -1),
        ]
    };

    let mut spool = Spool::open(dir.path(), &config).unwrap();
    let start = Instant::now();
    for i in 0..POLLS {
        spool.append(&poll(i)).unwrap();
    }
    spool.sync().unwrap();
    let elapsed = start.elapsed();
    let readings = spool.appended_total();
    assert_eq!(spool.dropped_total(), 0, "stay below max_bytes");
    println!(
        "appended {readings} readings in {POLLS} records in {:.2} s: {:.0} readings/s \
         (sync_interval {:?}, sync_bytes {})",
        elapsed.as_secs_f64(),
        readings as f64 / elapsed.as_secs_f64(),
        config.sync_interval,
        config.sync_bytes,
    );
    println!(
        "{} bytes on disk: {:.2} bytes per reading",
        spool.bytes(),
        spool.bytes() as f64 / readings as f64
    );
    drop(spool);

    let start = Instant::now();
    let spool = Spool::open(dir.path(), &config).unwrap();
    println!(
        "reopened (recovery scan of {} bytes) in {:.2} s",
        spool.bytes(),
        start.elapsed().as_secs_f64()
    );
}
