//! The spool killed mid-write, for real: a writer process appends numbered readings as fast as
//! it can, syncing every 2 ms and acknowledging now and then as a sender would, and reports
//! each sync on stdout ("synced N": records up to N are durable). The test SIGKILLs it after a
//! chosen number of syncs, reopens the spool and checks that every record reported durable is
//! there, that the records are whole, in order and numbered without gaps, that nothing
//! acknowledged comes back, and that appending goes on with fresh IDs. Then the next round's
//! writer continues on the same spool. The kill points differ by round and are chosen by the
//! writer's progress, never by a sleep.
//!
//! The writer is this same binary, started again with `DROVER_SPOOL_KILL_WRITER` naming the
//! spool directory, so nothing test-only goes into the agent. That is why this test runs without
//! libtest's harness: `main` is either the writer or the test.

#![allow(clippy::unwrap_used, reason = "a panic is how a test fails")]

use std::io::{BufRead as _, BufReader, Write as _};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use drover_agent::config::SpoolConfig;
use drover_agent::spool::Spool;
use drover_protocol::reading::{Channel, ClockState, MeterId, Reading};

const WRITER_ENV: &str = "DROVER_SPOOL_KILL_WRITER";
const NAME: &str = "spool_kill";

/// Syncs seen before each round's kill.
const KILL_AFTER_SYNCS: [u32; 6] = [1, 3, 10, 40, 120, 300];

fn main() {
    if let Some(dir) = std::env::var_os(WRITER_ENV) {
        writer(Path::new(&dir));
        return;
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list") {
        println!("{NAME}: test");
        return;
    }
    // `cargo test NAME` passes NAME on to every test binary: honour it like libtest would.
    if let Some(filter) = args.iter().find(|a| !a.starts_with('-'))
        && !NAME.contains(filter.as_str())
    {
        println!("running 0 tests");
        return;
    }
    println!("running 1 test");
    kill_rounds();
    println!("test {NAME} ... ok");
}

fn config() -> SpoolConfig {
    SpoolConfig {
        max_bytes: 1 << 30,
        // Small segments, so that kills also land on segment changes.
        segment_bytes: 16 * 1024,
        sync_interval: Duration::from_millis(2),
        sync_bytes: 64 * 1024,
    }
}

/// Readings numbered from `first`: each value is the reading's own number.
fn numbered(first: u64, n: usize) -> Vec<Reading> {
    (first..first + n as u64)
        .map(|i| Reading {
            meter: MeterId::parse(&format!("meter-{}", i % 2)).unwrap(),
            channel: Channel::EnergyImport,
            ts_ms: 1_700_000_000_000 + i as i64,
            value: i as i64,
            scale: 0,
            clock: ClockState::Synced,
        })
        .collect()
}

/// The writer process: appends until it is killed.
fn writer(dir: &Path) {
    let mut spool = Spool::open(dir, &config()).unwrap();
    let mut out = std::io::stdout().lock();
    writeln!(out, "opened {}", spool.last_id()).unwrap();
    let mut synced = spool.synced_id();
    let mut syncs = 0u64;
    for i in 0.. {
        let first = spool.appended_total();
        spool.append(&numbered(first, 1 + i % 4)).unwrap();
        if spool.synced_id() == synced {
            continue;
        }
        synced = spool.synced_id();
        syncs += 1;
        writeln!(out, "synced {synced}").unwrap();
        // Now and then, acknowledge all but the newest records, as the sender would.
        if syncs.is_multiple_of(16) && synced > 500 {
            spool.ack(synced - 500).unwrap();
            writeln!(out, "acked {}", synced - 500).unwrap();
        }
        out.flush().unwrap();
    }
}

/// What the writer said before it died.
#[derive(Debug, Default)]
struct Progress {
    opened_at: Option<u64>,
    synced: u64,
    acked: u64,
    syncs: u32,
}

impl Progress {
    fn note(&mut self, line: &str) {
        let (word, number) = line.split_once(' ').unwrap();
        let number: u64 = number.parse().unwrap();
        match word {
            "opened" => self.opened_at = Some(number),
            "synced" => {
                assert!(number > self.synced, "{line}");
                self.synced = number;
                self.syncs += 1;
            }
            "acked" => self.acked = number,
            _ => panic!("unexpected writer output {line:?}"),
        }
    }
}

fn kill_rounds() {
    let dir = tempfile::tempdir().unwrap();
    let mut last_id = 0;
    for kill_after in KILL_AFTER_SYNCS {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .env(WRITER_ENV, dir.path())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut progress = Progress::default();
        while progress.syncs < kill_after {
            let line = lines.next().expect("the writer exited early").unwrap();
            progress.note(&line);
        }
        child.kill().unwrap();
        // What it printed before the signal landed counts too.
        for line in lines {
            progress.note(&line.unwrap());
        }
        let status = child.wait().unwrap();
        assert!(!status.success(), "the writer was killed: {status}");

        assert_eq!(
            progress.opened_at,
            Some(last_id),
            "the writer found every record the last round left"
        );
        last_id = check(dir.path(), &progress);
        eprintln!("killed after {kill_after} syncs: {progress:?}, {last_id} records");
    }
}

/// Reopens the spool after a kill, checks it and appends one record; returns the last ID.
fn check(dir: &Path, progress: &Progress) -> u64 {
    let mut spool = Spool::open(dir, &config()).unwrap();
    let last = spool.last_id();
    assert!(
        last >= progress.synced,
        "record {} was reported durable, the spool ends at {last}",
        progress.synced
    );
    assert!(spool.first_unacked_id() > progress.acked);
    assert_eq!(spool.dropped_total(), 0);

    let records = spool.read(0, usize::MAX).unwrap();
    let mut id = spool.first_unacked_id();
    let mut reading = records.first().map_or(0, |r| r.first_reading);
    for record in &records {
        assert_eq!(record.id, id, "records are contiguous");
        assert_eq!(record.first_reading, reading, "readings are contiguous");
        assert_eq!(record.readings, numbered(reading, record.readings.len()));
        id += 1;
        reading = record.end_reading();
    }
    assert_eq!(id, last + 1, "every record up to the last is readable");
    if !records.is_empty() {
        assert_eq!(
            spool.appended_total(),
            reading,
            "reading numbers go on from the last"
        );
    }

    let fresh = spool.append(&numbered(spool.appended_total(), 1)).unwrap();
    assert_eq!(fresh, last + 1, "appending goes on with a fresh ID");
    fresh
}
