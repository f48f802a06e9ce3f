//! Running install commands (`update.sh`, the app's stop, start and health commands) with a
//! timeout, their output captured, and their whole process group killed when they overrun.
//!
//! - Each command runs in its own process group, so that a timeout kills what it started too
//!   (a script that ran `sleep 3600 &` must not outlive its timeout).
//! - The command is spawned directly by the agent, with no shell in between: `update.sh` is
//!   executed itself (its `#!` line is honoured), app commands are `sh -c <line>`. The parent of
//!   the command is therefore the agent, which the crash tests rely on (`kill -9 $PPID`).
//! - stdout and stderr go to one file opened once, so their lines interleave as they happened.
//!   A file rather than a pipe, because a command may leave a background process holding its
//!   output open: with a pipe the agent would wait for EOF forever, or kill that process with
//!   SIGPIPE when it stops reading.
//! - Environment variables are set on the child only. (The seed updater set them on its own
//!   process, so every later child inherited the previous update's config.)

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read as _, Seek as _, SeekFrom};
use std::os::unix::fs::OpenOptionsExt as _;
use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use drover_protocol::MAX_OUTPUT_BYTES;
use drover_protocol::device::truncate_output;
use tokio_util::sync::CancellationToken;

use crate::fsutil::{Context as _, FileError};

/// `errno` for "this file is not an executable format" (a script without a `#!` line).
const ENOEXEC: i32 = 8;

/// A command to run.
#[derive(Debug, Clone)]
pub struct Invocation {
    /// The program (a path, or a name looked up in `PATH`).
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<String>,
    /// The working directory.
    pub cwd: PathBuf,
    /// Extra environment variables, set on the child only.
    pub env: Vec<(String, String)>,
    /// When to kill the process group.
    pub timeout: Duration,
    /// The file the output is captured in (removed afterwards).
    pub log: PathBuf,
}

impl Invocation {
    /// `sh -c <line>` in `cwd`.
    pub fn shell(line: &str, cwd: &Path, timeout: Duration, log: PathBuf) -> Invocation {
        Invocation {
            program: PathBuf::from("sh"),
            args: vec!["-c".into(), line.into()],
            cwd: cwd.to_path_buf(),
            env: Vec::new(),
            timeout,
            log,
        }
    }
}

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// It exited with this code.
    Exited(i32),
    /// A signal (not sent by the agent) ended it.
    Signalled(i32),
    /// It overran its timeout; its process group was killed.
    TimedOut,
    /// The agent is shutting down; its process group was killed.
    Cancelled,
}

/// A finished command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finished {
    /// How it ended.
    pub ending: Ending,
    /// stdout and stderr, interleaved, at most [`MAX_OUTPUT_BYTES`].
    pub output: String,
}

impl Finished {
    /// Whether it exited with code 0.
    pub fn success(&self) -> bool {
        self.ending == Ending::Exited(0)
    }

    /// A short description of how it ended, for report messages.
    pub fn describe(&self, what: &str, timeout: Duration) -> String {
        match self.ending {
            Ending::Exited(0) => format!("{what} succeeded"),
            Ending::Exited(code) => format!("{what} exited with code {code}"),
            Ending::Signalled(signal) => format!("{what} was killed by signal {signal}"),
            Ending::TimedOut => format!(
                "{what} did not finish within {} and was killed",
                crate::duration::format_duration(timeout)
            ),
            Ending::Cancelled => format!("{what} was stopped because the agent is shutting down"),
        }
    }
}

/// Why a command could not be run at all.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The program could not be started.
    #[error("cannot start {}: {source}", program.display())]
    Spawn {
        /// The program.
        program: PathBuf,
        /// The operating system's error.
        source: io::Error,
    },
    /// Waiting for the process failed.
    #[error("waiting for {}: {source}", program.display())]
    Wait {
        /// The program.
        program: PathBuf,
        /// The operating system's error.
        source: io::Error,
    },
    /// The output file could not be made or read.
    #[error(transparent)]
    Output(#[from] FileError),
}

/// Runs a command to its end, its timeout, or `cancel`.
pub async fn run(inv: &Invocation, cancel: &CancellationToken) -> Result<Finished, ProcessError> {
    let log = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&inv.log)
        .at("creating", &inv.log)?;
    let mut child = match spawn(inv, &inv.program, &inv.args, &log) {
        Err(e) if e.raw_os_error() == Some(ENOEXEC) => {
            // A script without a `#!` line: run it with sh, as a shell would.
            let mut args = vec![inv.program.to_string_lossy().into_owned()];
            args.extend(inv.args.iter().cloned());
            spawn(inv, Path::new("sh"), &args, &log)
        }
        other => other,
    }
    .map_err(|source| ProcessError::Spawn {
        program: inv.program.clone(),
        source,
    })?;
    drop(log);
    let pid = child.id();
    let wait_error = |source| ProcessError::Wait {
        program: inv.program.clone(),
        source,
    };
    let waited = tokio::select! {
        status = child.wait() => Ok(status),
        () = tokio::time::sleep(inv.timeout) => Err(Ending::TimedOut),
        () = cancel.cancelled() => Err(Ending::Cancelled),
    };
    let ending = match waited {
        Ok(status) => ending_of(status.map_err(wait_error)?),
        Err(ending) => {
            kill_group(pid, &mut child);
            child.wait().await.map_err(wait_error)?;
            ending
        }
    };
    let output = read_capped(&inv.log)?;
    let _ = fs::remove_file(&inv.log);
    Ok(Finished { ending, output })
}

fn spawn(
    inv: &Invocation,
    program: &Path,
    args: &[String],
    log: &File,
) -> io::Result<tokio::process::Child> {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .current_dir(&inv.cwd)
        .envs(inv.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log.try_clone()?)
        .process_group(0);
    // `cmd` (and with it the child's copies of the log file) is dropped on return.
    cmd.spawn()
}

fn ending_of(status: ExitStatus) -> Ending {
    match (status.code(), status.signal()) {
        (Some(code), _) => Ending::Exited(code),
        (None, Some(signal)) => Ending::Signalled(signal),
        (None, None) => Ending::Exited(-1),
    }
}

/// Kills the child's whole process group (its ID is the child's PID, see `process_group(0)`).
/// If that fails, at least the child itself is killed.
fn kill_group(pid: Option<u32>, child: &mut tokio::process::Child) {
    let group = pid
        .and_then(|pid| i32::try_from(pid).ok())
        .and_then(rustix::process::Pid::from_raw);
    if let Some(group) = group {
        match rustix::process::kill_process_group(group, rustix::process::Signal::KILL) {
            Ok(()) => return,
            Err(e) => tracing::warn!(pid = ?pid, error = %e, "kill of the process group failed"),
        }
    }
    let _ = child.start_kill();
}

/// Reads at most [`MAX_OUTPUT_BYTES`] of the output file: all of it, or its head and its tail
/// (where a failing script usually says why), without loading a huge file into memory.
fn read_capped(path: &Path) -> Result<String, FileError> {
    let mut file = File::open(path).at("reading", path)?;
    let len = file.metadata().at("reading", path)?.len();
    let max = MAX_OUTPUT_BYTES as u64;
    if len <= max {
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).at("reading", path)?;
        return Ok(String::from_utf8_lossy(&bytes).into_owned());
    }
    let half = max / 2;
    let mut head = vec![0; half as usize];
    file.read_exact(&mut head).at("reading", path)?;
    let mut tail = Vec::new();
    file.seek(SeekFrom::Start(len - half)).at("reading", path)?;
    file.read_to_end(&mut tail).at("reading", path)?;
    let text = format!(
        "{}\n[... {} bytes cut ...]\n{}",
        String::from_utf8_lossy(&head),
        len - 2 * half,
        String::from_utf8_lossy(&tail)
    );
    Ok(truncate_output(&text, MAX_OUTPUT_BYTES))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inv(dir: &Path, line: &str, timeout: Duration) -> Invocation {
        Invocation::shell(line, dir, timeout, dir.join("out.log"))
    }

    #[tokio::test]
    async fn captures_stdout_and_stderr_interleaved() {
        let dir = tempfile::tempdir().unwrap();
        let done = run(
            &inv(
                dir.path(),
                "echo one; echo two >&2; echo three; exit 3",
                Duration::from_secs(30),
            ),
            &CancellationToken::new(),
        )
        .await
        .unwrap();
        assert_eq!(done.ending, Ending::Exited(3));
        assert_eq!(done.output, "one\ntwo\nthree\n");
        assert!(!dir.path().join("out.log").exists());
    }

    #[tokio::test]
    async fn env_is_set_on_the_child_only_and_cwd_is_used() {
        let dir = tempfile::tempdir().unwrap();
        let mut invocation = inv(
            dir.path(),
            "echo \"$DROVER_TEST_VAR\"; pwd",
            Duration::from_secs(30),
        );
        invocation
            .env
            .push(("DROVER_TEST_VAR".into(), "hello".into()));
        let done = run(&invocation, &CancellationToken::new()).await.unwrap();
        assert!(done.success());
        let cwd = dir.path().canonicalize().unwrap();
        assert_eq!(done.output, format!("hello\n{}\n", cwd.display()));
        assert!(std::env::var("DROVER_TEST_VAR").is_err());
    }

    #[tokio::test]
    async fn a_timeout_kills_the_whole_process_group() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("bg.pid");
        let line = format!(
            "sleep 3600 & echo $! > {}; echo started; wait",
            pid_file.display()
        );
        let done = run(
            &inv(dir.path(), &line, Duration::from_millis(500)),
            &CancellationToken::new(),
        )
        .await
        .unwrap();
        assert_eq!(done.ending, Ending::TimedOut);
        assert_eq!(done.output, "started\n");
        let pid = fs::read_to_string(&pid_file).unwrap().trim().to_string();
        crate::testutil::wait_until("the background sleep to die", || {
            !crate::testutil::process_alive(&pid)
        })
        .await;
    }

    #[tokio::test]
    async fn cancelling_kills_the_command() {
        let dir = tempfile::tempdir().unwrap();
        let cancel = CancellationToken::new();
        let invocation = inv(
            dir.path(),
            "echo waiting; sleep 3600",
            Duration::from_secs(3600),
        );
        let task = {
            let cancel = cancel.clone();
            tokio::spawn(async move { run(&invocation, &cancel).await })
        };
        let log = dir.path().join("out.log");
        crate::testutil::wait_until("the command to start", || {
            fs::read_to_string(&log).is_ok_and(|t| t.contains("waiting"))
        })
        .await;
        cancel.cancel();
        let done = task.await.unwrap().unwrap();
        assert_eq!(done.ending, Ending::Cancelled);
    }

    #[tokio::test]
    async fn huge_output_keeps_head_and_tail() {
        let dir = tempfile::tempdir().unwrap();
        let line = "echo FIRST; head -c 300000 /dev/zero | tr '\\0' x; echo; echo LAST";
        let done = run(
            &inv(dir.path(), line, Duration::from_secs(30)),
            &CancellationToken::new(),
        )
        .await
        .unwrap();
        assert!(done.output.len() <= MAX_OUTPUT_BYTES);
        assert!(done.output.starts_with("FIRST\n"));
        assert!(done.output.ends_with("LAST\n"));
        assert!(done.output.contains("bytes cut"));
    }

    #[tokio::test]
    async fn a_missing_program_is_a_spawn_error() {
        let dir = tempfile::tempdir().unwrap();
        let invocation = Invocation {
            program: dir.path().join("nope"),
            args: vec![],
            cwd: dir.path().to_path_buf(),
            env: vec![],
            timeout: Duration::from_secs(1),
            log: dir.path().join("out.log"),
        };
        let err = run(&invocation, &CancellationToken::new())
            .await
            .unwrap_err();
        assert!(matches!(err, ProcessError::Spawn { .. }), "{err}");
    }
}
