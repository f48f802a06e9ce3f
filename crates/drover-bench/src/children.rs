//! The processes a benchmark starts (the hub, nginx, an agent): where their binaries are, and a
//! guard that kills them when dropped, so none outlives the benchmark, even after an error.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::io::AsyncBufReadExt as _;

/// The command that builds every binary the benchmarks run.
pub const BUILD_COMMAND: &str =
    "cargo build --release -p drover-cli -p drover-agent -p drover-bench";

/// How many lines of a child's stderr are kept for error messages.
const KEPT_LINES: usize = 40;

/// A Drover binary built beside this one (`target/release/<name>`).
pub fn sibling_binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("finding the drover-bench binary")?;
    let dir = exe
        .parent()
        .context("the drover-bench binary has no parent directory")?;
    let path = dir.join(name);
    if !path.is_file() {
        bail!(
            "{} is missing: build it beside drover-bench with `{BUILD_COMMAND}`",
            path.display()
        );
    }
    Ok(path)
}

/// A system tool from Debian's packages, looked up on `PATH` and in the sbin folders (nginx is
/// in `/usr/sbin`, which is not on every user's `PATH`).
pub fn system_tool(name: &str) -> anyhow::Result<PathBuf> {
    let path_var = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path_var)
        .chain(["/usr/sbin", "/usr/bin", "/sbin", "/usr/local/sbin"].map(PathBuf::from));
    for dir in dirs {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!(
        "{name} is not installed: install the load generator and the reference server with `apt-get install wrk nginx-light`"
    )
}

/// A running child process, killed (SIGKILL) when dropped. Its stderr is drained in the
/// background (a full pipe would stall it) and the last lines are kept for error messages.
#[derive(Debug)]
pub struct Child {
    name: String,
    child: tokio::process::Child,
    pid: u32,
    stderr: Arc<Mutex<VecDeque<String>>>,
}

impl Child {
    /// Starts `command` with stdout discarded and stderr captured.
    pub fn spawn(name: &str, mut command: tokio::process::Command) -> anyhow::Result<Child> {
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = command
            .spawn()
            .with_context(|| format!("starting {name} ({command:?})"))?;
        let pid = child
            .id()
            .with_context(|| format!("{name} exited at once"))?;
        let stderr = Arc::new(Mutex::new(VecDeque::new()));
        if let Some(pipe) = child.stderr.take() {
            let kept = Arc::clone(&stderr);
            tokio::spawn(async move {
                let mut lines = tokio::io::BufReader::new(pipe).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let mut kept = kept.lock().unwrap_or_else(|p| p.into_inner());
                    if kept.len() == KEPT_LINES {
                        kept.pop_front();
                    }
                    kept.push_back(line);
                }
            });
        }
        Ok(Child {
            name: name.to_string(),
            child,
            pid,
            stderr,
        })
    }

    /// The process ID.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The last lines it wrote to stderr.
    pub fn recent_stderr(&self) -> Vec<String> {
        self.stderr
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    /// Fails, with its last output, if the process has exited.
    pub fn ensure_running(&mut self) -> anyhow::Result<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => bail!(
                "{} exited ({status}); its last output:\n{}",
                self.name,
                self.recent_stderr().join("\n")
            ),
            Err(e) => Err(e).with_context(|| format!("checking on {}", self.name)),
        }
    }

    /// Asks the process to stop (SIGTERM) and waits up to `grace` for it; kills it after that.
    pub async fn terminate(mut self, grace: Duration) -> anyhow::Result<ExitStatus> {
        // `kill` from procps, because this crate has no unsafe code to call kill(2) itself.
        let sent = tokio::process::Command::new("kill")
            .arg("-TERM")
            .arg(self.pid.to_string())
            .status()
            .await
            .context("running kill -TERM")?;
        if sent.success()
            && let Ok(status) = tokio::time::timeout(grace, self.child.wait()).await
        {
            return status.with_context(|| format!("waiting for {} to stop", self.name));
        }
        // `kill` fails when the process is already gone.
        if let Ok(Some(status)) = self.child.try_wait() {
            return Ok(status);
        }
        self.child
            .kill()
            .await
            .with_context(|| format!("killing {}", self.name))?;
        bail!(
            "{} did not stop within {grace:?} of SIGTERM and was killed",
            self.name
        )
    }
}
