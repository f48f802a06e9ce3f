//! The command source: runs a program on the source's schedule and turns what it prints into
//! readings, for meters the agent has no driver for (an inverter's HTTP API, a serial
//! protocol, a vendor tool).
//!
//! The program runs as `sh -c <command>` in its own process group, with stdin closed. It prints
//! one reading per line on stdout:
//!
//! ```text
//! <meter> <channel> <value> [<scale>]
//! ```
//!
//! - `meter`: the meter ID (1 to 64 letters, digits, `-`, `_`, `.`, `:`), such as
//!   `inverter-7A1234`; use the meter's own serial number where it has one.
//! - `channel`: a channel name ([`Channel::name`]): `energy_import`, `energy_export`, `power`,
//!   `voltage_l1` .. `voltage_l3`, `current_l1` .. `current_l3`, `frequency`, `pulses`,
//!   `energy_interval`.
//! - `value`: an integer; the reading is `value × 10^scale` in the channel's unit (Wh, W, V,
//!   A, Hz).
//! - `scale`: optional, -3 to 3, default 0. `power 12345 -1` is 1234.5 W.
//!
//! Fields are separated by spaces or tabs; empty lines and lines starting with `#` are
//! ignored. Each reading is stamped with the time its line arrived, so a program that reads
//! several meters one after another gives each its own time. A line that does not parse is
//! skipped and logged (at most once every few minutes per source, with the first bad line).
//!
//! The program gets `timeout` to finish; then its whole process group is killed and what it
//! printed until then is kept. Its stderr is logged when it fails. At most [`MAX_LINES`] lines
//! of at most [`MAX_LINE_BYTES`] bytes are read per run.

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use drover_protocol::reading::{Channel, MeterId, Reading};
use tokio::io::{AsyncRead, AsyncReadExt as _};
use tokio::process::{Child, Command};

use super::clock::Clock;
use super::config::CommandSourceConfig;
use super::poll::{ErrorLog, Source};

/// The longest line read.
pub const MAX_LINE_BYTES: usize = 1024;
/// The most lines read per run.
pub const MAX_LINES: usize = 10_000;
/// The most stderr kept for the log.
const MAX_STDERR_BYTES: usize = 2048;

/// Why a line is not a reading.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LineError {
    /// Not 3 or 4 fields.
    #[error("expected `<meter> <channel> <value> [<scale>]`")]
    Fields,
    /// The meter ID is not valid.
    #[error("{0}")]
    Meter(String),
    /// No such channel.
    #[error("unknown channel {0:?}")]
    Channel(String),
    /// The value is not an integer.
    #[error("the value {0:?} is not an integer (use the scale for decimals: `12345 -1`)")]
    Value(String),
    /// The scale is not -3 to 3.
    #[error("the scale {0:?} is not an integer from -3 to 3")]
    Scale(String),
    /// The line is longer than [`MAX_LINE_BYTES`] or not UTF-8.
    #[error("the line is longer than {MAX_LINE_BYTES} bytes or not UTF-8")]
    Garbled,
}

/// A parsed line: everything of a reading but its time and clock state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    /// The meter.
    pub meter: MeterId,
    /// The channel.
    pub channel: Channel,
    /// The scaled value.
    pub value: i64,
    /// Its scale.
    pub scale: i8,
}

/// Parses one line; `Ok(None)` for a blank line or a comment.
pub fn parse_line(line: &str) -> Result<Option<Line>, LineError> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return Ok(None);
    }
    let fields: Vec<&str> = line.split_ascii_whitespace().collect();
    let (meter, channel, value, scale) = match fields[..] {
        [meter, channel, value] => (meter, channel, value, None),
        [meter, channel, value, scale] => (meter, channel, value, Some(scale)),
        _ => return Err(LineError::Fields),
    };
    let meter = MeterId::parse(meter).map_err(|e| LineError::Meter(e.to_string()))?;
    let channel = Channel::parse(channel).ok_or_else(|| LineError::Channel(channel.into()))?;
    let value = value
        .parse::<i64>()
        .map_err(|_| LineError::Value(value.into()))?;
    let scale = match scale {
        None => 0,
        Some(text) => text
            .parse::<i8>()
            .ok()
            .filter(|s| (-3..=3).contains(s))
            .ok_or_else(|| LineError::Scale(text.into()))?,
    };
    Ok(Some(Line {
        meter,
        channel,
        value,
        scale,
    }))
}

/// A program that prints readings.
#[derive(Debug)]
pub struct CommandSource {
    name: String,
    command: String,
    timeout: Duration,
    clock: Arc<dyn Clock>,
    errors: ErrorLog<String>,
}

impl CommandSource {
    /// The source for `config`.
    pub fn new(config: &CommandSourceConfig, clock: Arc<dyn Clock>) -> CommandSource {
        CommandSource {
            name: config.name.clone(),
            command: config.command.clone(),
            timeout: config.timeout,
            clock,
            errors: ErrorLog::new(),
        }
    }

    /// Runs the program once and returns its readings.
    pub async fn run_once(&mut self) -> Vec<Reading> {
        let mut child = match self.spawn() {
            Ok(child) => child,
            Err(e) => {
                self.errors
                    .failed(&self.name, &format!("cannot start: {e}"));
                return Vec::new();
            }
        };
        // Killed on every way out of this function, including a poll dropped at shutdown.
        let group = GroupGuard::new(&child);
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let mut run = Run {
            readings: Vec::new(),
            lines: 0,
            bad: 0,
            first_bad: None,
        };
        let mut stderr_text = Vec::new();
        let finished = tokio::time::timeout(self.timeout, async {
            let (_, _, status) = tokio::join!(
                self.read_lines(stdout, &mut run),
                read_capped(stderr, &mut stderr_text),
                child.wait()
            );
            status
        })
        .await;
        drop(group);
        let stderr_text = String::from_utf8_lossy(&stderr_text).trim().to_string();
        let failure = match finished {
            Err(_) => Some(format!(
                "did not finish within {}; killed",
                crate::duration::format_duration(self.timeout)
            )),
            Ok(Err(e)) => Some(format!("waiting for it failed: {e}")),
            Ok(Ok(status)) if !status.success() => Some(format!("{status}")),
            Ok(Ok(_)) => None,
        };
        match failure {
            Some(why) => {
                let why = if stderr_text.is_empty() {
                    why
                } else {
                    format!("{why}; stderr: {stderr_text}")
                };
                self.errors.failed(&self.name, &why);
            }
            None => self.errors.succeeded(&self.name),
        }
        let bad_key = format!("{} output", self.name);
        match run.first_bad {
            Some(first) => {
                let what = format!("{} bad lines skipped, the first: {first}", run.bad);
                self.errors.failed(&bad_key, &what);
            }
            None => self.errors.succeeded(&bad_key),
        }
        run.readings
    }

    fn spawn(&self) -> std::io::Result<Child> {
        Command::new("sh")
            .arg("-c")
            .arg(&self.command)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
    }

    /// Reads stdout line by line, stamping each reading as its line arrives.
    async fn read_lines(&self, stdout: Option<impl AsyncRead + Unpin>, run: &mut Run) {
        let Some(mut stdout) = stdout else { return };
        let mut pending: Vec<u8> = Vec::new();
        let mut chunk = [0u8; 4096];
        // A line that grew too long is skipped up to its end.
        let mut too_long = false;
        loop {
            let n = match stdout.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            for &byte in &chunk[..n] {
                if byte != b'\n' {
                    if pending.len() < MAX_LINE_BYTES {
                        pending.push(byte);
                    } else {
                        too_long = true;
                    }
                    continue;
                }
                if run.lines >= MAX_LINES {
                    return;
                }
                self.take_line(&pending, too_long, run);
                pending.clear();
                too_long = false;
            }
        }
        // A last line without a newline still counts.
        if !pending.is_empty() && run.lines < MAX_LINES {
            self.take_line(&pending, too_long, run);
        }
    }

    fn take_line(&self, bytes: &[u8], too_long: bool, run: &mut Run) {
        run.lines += 1;
        let parsed = match std::str::from_utf8(bytes) {
            Ok(text) if !too_long => parse_line(text),
            _ => Err(LineError::Garbled),
        };
        match parsed {
            Ok(Some(line)) => run.readings.push(Reading {
                meter: line.meter,
                channel: line.channel,
                ts_ms: self.clock.now_ms(),
                value: line.value,
                scale: line.scale,
                clock: self.clock.state(),
            }),
            Ok(None) => {}
            Err(e) => run.bad_line(bytes, &e),
        }
    }
}

/// What one run produced.
struct Run {
    readings: Vec<Reading>,
    lines: usize,
    bad: usize,
    first_bad: Option<String>,
}

impl Run {
    fn bad_line(&mut self, line: &[u8], error: &LineError) {
        self.bad += 1;
        if self.first_bad.is_none() {
            let text: String = String::from_utf8_lossy(line).chars().take(120).collect();
            self.first_bad = Some(format!("{text:?}: {error}"));
        }
    }
}

async fn read_capped(stream: Option<impl AsyncRead + Unpin>, into: &mut Vec<u8>) {
    let Some(mut stream) = stream else { return };
    let mut chunk = [0u8; 1024];
    while let Ok(n) = stream.read(&mut chunk).await {
        if n == 0 {
            break;
        }
        let room = MAX_STDERR_BYTES.saturating_sub(into.len());
        into.extend_from_slice(&chunk[..n.min(room)]);
    }
}

/// Kills the program's whole process group when dropped (a program that started `sleep &`
/// must not outlive its timeout).
struct GroupGuard(Option<rustix::process::Pid>);

impl GroupGuard {
    fn new(child: &Child) -> GroupGuard {
        let pid = child
            .id()
            .and_then(|pid| i32::try_from(pid).ok())
            .and_then(rustix::process::Pid::from_raw);
        GroupGuard(pid)
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Some(group) = self.0 {
            // ESRCH (the group is gone) is the normal case after a clean exit.
            let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
        }
    }
}

impl Source for CommandSource {
    async fn poll(&mut self) -> Vec<Reading> {
        self.run_once().await
    }
}

#[cfg(test)]
mod tests {
    use drover_protocol::reading::ClockState;

    use super::*;
    use crate::testutil::{FixedClock, process_alive};

    fn source(command: &str, timeout: Duration) -> CommandSource {
        let config = CommandSourceConfig {
            name: "test".into(),
            command: command.into(),
            timeout,
            ..CommandSourceConfig::default()
        };
        CommandSource::new(&config, Arc::new(FixedClock(ClockState::Unknown)))
    }

    #[test]
    fn lines_parse_into_readings() {
        let line = parse_line("inverter-7 power 12345 -1").unwrap().unwrap();
        assert_eq!(line.meter.as_str(), "inverter-7");
        assert_eq!(
            (line.channel, line.value, line.scale),
            (Channel::Power, 12_345, -1)
        );
        let line = parse_line("  m1\tenergy_import   99  ").unwrap().unwrap();
        assert_eq!(
            (line.channel, line.value, line.scale),
            (Channel::EnergyImport, 99, 0)
        );
        assert_eq!(parse_line("").unwrap(), None);
        assert_eq!(parse_line("# a comment").unwrap(), None);
        let bad = [
            ("m1 power", LineError::Fields),
            ("m1 power 1 0 extra", LineError::Fields),
            ("m1 watts 1", LineError::Channel("watts".into())),
            ("m1 power 12.5", LineError::Value("12.5".into())),
            ("m1 power 1 4", LineError::Scale("4".into())),
            ("m1 power 1 x", LineError::Scale("x".into())),
        ];
        for (text, expected) in bad {
            assert_eq!(parse_line(text).unwrap_err(), expected, "{text}");
        }
        assert!(matches!(
            parse_line("a/b power 1"),
            Err(LineError::Meter(_))
        ));
    }

    #[tokio::test]
    async fn good_lines_become_readings_and_bad_ones_are_skipped() {
        let script = "echo 'm1 energy_import 1000'; echo 'garbage'; echo '# note'; \
                      echo 'm2 voltage_l1 2304 -1'; echo 'm1 power 12.5'; printf 'm1 power 500'";
        let mut source = source(script, Duration::from_secs(30));
        let readings = source.run_once().await;
        let got: Vec<(&str, Channel, i64, i8)> = readings
            .iter()
            .map(|r| (r.meter.as_str(), r.channel, r.value, r.scale))
            .collect();
        assert_eq!(
            got,
            [
                ("m1", Channel::EnergyImport, 1000, 0),
                ("m2", Channel::VoltageL1, 2304, -1),
                ("m1", Channel::Power, 500, 0),
            ]
        );
        assert!(readings.iter().all(|r| r.ts_ms == 1_750_000_000_000));
        assert!(source.errors.is_failing(&"test output".to_string()));
        assert!(!source.errors.is_failing(&"test".to_string()));
    }

    #[tokio::test]
    async fn a_hanging_program_is_killed_with_its_children_and_its_output_kept() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("pid");
        let script = format!(
            "echo 'm1 power 42'; sleep 3600 & echo $! > {}; wait",
            pid_file.display()
        );
        let mut source = source(&script, Duration::from_millis(500));
        let started = std::time::Instant::now();
        let readings = source.run_once().await;
        assert!(started.elapsed() < Duration::from_secs(20));
        assert_eq!(readings.len(), 1);
        assert_eq!(readings[0].value, 42);
        assert!(source.errors.is_failing(&"test".to_string()));
        let pid = std::fs::read_to_string(&pid_file).unwrap();
        crate::testutil::wait_until("the background sleep to be killed", || {
            !process_alive(pid.trim())
        })
        .await;
    }

    #[tokio::test]
    async fn a_failing_program_is_reported_and_a_missing_one_too() {
        let mut failing = source(
            "echo 'm1 power 1'; echo oops >&2; exit 3",
            Duration::from_secs(30),
        );
        assert_eq!(failing.run_once().await.len(), 1);
        assert!(failing.errors.is_failing(&"test".to_string()));
        let mut missing = source("/nonexistent/program", Duration::from_secs(30));
        assert!(missing.run_once().await.is_empty());
        assert!(missing.errors.is_failing(&"test".to_string()));
    }
}
