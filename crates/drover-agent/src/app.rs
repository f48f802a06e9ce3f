//! The `app` install module's moving parts: release directories, the `current` symlink, and the
//! stop, start and health commands. The order they run in, and what happens after a crash, is
//! the update state machine's business (`crate::update`); everything here is a single step that
//! is safe to repeat.
//!
//! ```text
//! <app root>/
//!   releases/.<version>.partial/   being unpacked; never used
//!   releases/<version>/            complete (renamed into place only after unpacking finished)
//!   current -> releases/<version>  swapped atomically: a new symlink renamed over the old one
//! ```

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use drover_protocol::artifact::ArtifactFormat;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::archive::{self, ArchiveError};
use crate::config::AppConfig;
use crate::fsutil::{self, Context as _, FileError};
use crate::process::{self, Ending, Finished, Invocation, ProcessError};

/// Paths under the app root.
#[derive(Debug, Clone)]
pub struct AppLayout {
    root: PathBuf,
}

impl AppLayout {
    /// The layout under `root`.
    pub fn new(root: impl Into<PathBuf>) -> AppLayout {
        AppLayout { root: root.into() }
    }

    /// The app root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `releases/`.
    pub fn releases_dir(&self) -> PathBuf {
        self.root.join("releases")
    }

    /// `releases/<version>`.
    pub fn release_dir(&self, version: &str) -> PathBuf {
        self.releases_dir().join(version)
    }

    /// `releases/.<version>.partial`.
    pub fn partial_dir(&self, version: &str) -> PathBuf {
        self.releases_dir().join(format!(".{version}.partial"))
    }

    /// The `current` symlink.
    pub fn current_link(&self) -> PathBuf {
        self.root.join("current")
    }
}

/// Why an app step failed.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// A local file operation failed.
    #[error(transparent)]
    File(#[from] FileError),
    /// The archive could not be unpacked.
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    /// A command could not be started.
    #[error(transparent)]
    Process(#[from] ProcessError),
}

/// Unpacks a verified archive into `releases/<version>`, by way of a partial directory, so that
/// a release directory exists only when it is complete. Blocking.
pub fn unpack_release(
    layout: &AppLayout,
    format: ArtifactFormat,
    artifact: &Path,
    version: &str,
) -> Result<(), AppError> {
    let releases = layout.releases_dir();
    fsutil::create_dir_all(&releases, 0o755)?;
    let partial = layout.partial_dir(version);
    let done = layout.release_dir(version);
    fsutil::remove_if_exists(&partial)?;
    fsutil::remove_if_exists(&done)?;
    archive::unpack(format, artifact, &partial)?;
    fs::rename(&partial, &done).at("renaming into place", &done)?;
    fsutil::sync_dir(&releases)?;
    Ok(())
}

/// The release `current` points at, if it points at a complete release directory.
pub fn current_release(layout: &AppLayout) -> Result<Option<String>, FileError> {
    let link = layout.current_link();
    let target = match fs::read_link(&link) {
        Ok(target) => target,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::InvalidInput
            ) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(FileError::new("reading the symlink", &link, e)),
    };
    let version = match target.strip_prefix("releases") {
        Ok(rest) if rest.components().count() == 1 => rest.to_string_lossy().into_owned(),
        _ => return Ok(None),
    };
    let complete = !version.starts_with('.') && layout.release_dir(&version).is_dir();
    Ok(complete.then_some(version))
}

/// Points `current` at `releases/<version>`, or removes it for `None`, atomically and durably.
pub fn point_current(layout: &AppLayout, version: Option<&str>) -> Result<(), FileError> {
    let link = layout.current_link();
    let Some(version) = version else {
        fsutil::remove_if_exists(&link)?;
        return fsutil::sync_dir(&layout.root);
    };
    let tmp = layout.root.join(".current.tmp");
    fsutil::remove_if_exists(&tmp)?;
    let target = Path::new("releases").join(version);
    std::os::unix::fs::symlink(&target, &tmp).at("creating the symlink", &tmp)?;
    // rename(2) replaces `current` in one step: there is no moment without a `current`.
    fs::rename(&tmp, &link).at("swapping", &link)?;
    fsutil::sync_dir(&layout.root)
}

/// Removes every release directory (and leftover partial directory) except those in `keep`.
pub fn prune(layout: &AppLayout, keep: &[&str]) -> Result<(), FileError> {
    let releases = layout.releases_dir();
    let entries = match fs::read_dir(&releases) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(FileError::new("listing", &releases, e)),
    };
    for entry in entries {
        let entry = entry.at("listing", &releases)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !keep.contains(&name.as_str()) {
            fsutil::remove_if_exists(&entry.path())?;
        }
    }
    fsutil::sync_dir(&releases)
}

/// Which command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// `[app] stop`.
    Stop,
    /// `[app] start`.
    Start,
    /// `[app] health`.
    Health,
    /// `[app] reload`, after a config-only change.
    Reload,
}

impl Hook {
    fn name(self) -> &'static str {
        match self {
            Hook::Stop => "the stop command",
            Hook::Start => "the start command",
            Hook::Health => "the health check",
            Hook::Reload => "the reload command",
        }
    }
}

/// Runs the configured commands with the environment every command gets.
#[derive(Debug, Clone)]
pub struct Hooks {
    /// The `[app]` config.
    pub config: AppConfig,
    /// `apps_root`.
    pub apps_root: PathBuf,
    /// The device config as JSON (`config`).
    pub config_json: String,
    /// `<state_dir>/config.json` (`DROVER_CONFIG_FILE`).
    pub config_file: PathBuf,
    /// Where command output is captured while a command runs.
    pub log: PathBuf,
}

/// What a command did, for reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookResult {
    /// Whether it succeeded (or was not configured).
    pub ok: bool,
    /// Whether the agent is shutting down and the command was killed.
    pub cancelled: bool,
    /// A one-line description.
    pub message: String,
    /// Its output.
    pub output: String,
}

impl Hooks {
    /// Runs `hook` for `release` in `dir` (or, for a stop with no release, in the app root).
    /// A command that is not configured succeeds at once.
    pub async fn run(
        &self,
        hook: Hook,
        release: Option<&str>,
        dir: &Path,
        cancel: &CancellationToken,
    ) -> Result<HookResult, AppError> {
        self.run_with_timeout(hook, release, dir, self.config.command_timeout, cancel)
            .await
    }

    async fn run_with_timeout(
        &self,
        hook: Hook,
        release: Option<&str>,
        dir: &Path,
        timeout: Duration,
        cancel: &CancellationToken,
    ) -> Result<HookResult, AppError> {
        let line = match hook {
            Hook::Stop => &self.config.stop,
            Hook::Start => &self.config.start,
            Hook::Health => &self.config.health,
            Hook::Reload => &self.config.reload,
        };
        let Some(line) = line else {
            return Ok(HookResult {
                ok: true,
                cancelled: false,
                message: format!("{} is not configured", hook.name()),
                output: String::new(),
            });
        };
        let mut invocation = Invocation::shell(line, dir, timeout, self.log.clone());
        invocation.env = vec![
            ("DROVER_RELEASE".into(), release.unwrap_or_default().into()),
            ("DROVER_RELEASE_DIR".into(), dir.display().to_string()),
            ("config".into(), self.config_json.clone()),
            (
                "DROVER_CONFIG_FILE".into(),
                self.config_file.display().to_string(),
            ),
            ("apps_root".into(), self.apps_root.display().to_string()),
        ];
        let finished: Finished = process::run(&invocation, cancel).await?;
        Ok(HookResult {
            ok: finished.success(),
            cancelled: finished.ending == Ending::Cancelled,
            message: finished.describe(hook.name(), timeout),
            output: finished.output,
        })
    }

    /// Runs the health check every `health_interval` until it passes or `health_window` is
    /// over. At least one check always runs. The result carries the last check's output.
    pub async fn health(
        &self,
        release: &str,
        dir: &Path,
        cancel: &CancellationToken,
    ) -> Result<HookResult, AppError> {
        let deadline = Instant::now() + self.config.health_window;
        let mut checks = 0u32;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let timeout = self
                .config
                .command_timeout
                .min(left.max(Duration::from_secs(1)));
            let mut result = self
                .run_with_timeout(Hook::Health, Some(release), dir, timeout, cancel)
                .await?;
            checks += 1;
            if result.ok || result.cancelled {
                return Ok(result);
            }
            if Instant::now() + self.config.health_interval >= deadline {
                result.message = format!(
                    "the health check did not pass within {} ({checks} checks; last: {})",
                    crate::duration::format_duration(self.config.health_window),
                    result.message
                );
                return Ok(result);
            }
            tokio::select! {
                () = tokio::time::sleep(self.config.health_interval) => {}
                () = cancel.cancelled() => {
                    result.cancelled = true;
                    return Ok(result);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{Entry, write_tar_gz};

    fn release_archive(dir: &Path, name: &str, marker: &str) -> PathBuf {
        let path = dir.join(format!("{name}.tar.gz"));
        write_tar_gz(
            &path,
            &[Entry::File("version.txt", marker.as_bytes(), 0o644)],
        );
        path
    }

    #[test]
    fn releases_appear_only_complete_and_current_swaps_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let layout = AppLayout::new(dir.path().join("app"));
        assert_eq!(current_release(&layout).unwrap(), None);
        for v in ["1", "2"] {
            let artifact = release_archive(dir.path(), v, v);
            unpack_release(&layout, ArtifactFormat::TarGz, &artifact, v).unwrap();
            assert!(!layout.partial_dir(v).exists());
        }
        point_current(&layout, Some("1")).unwrap();
        assert_eq!(current_release(&layout).unwrap().as_deref(), Some("1"));
        point_current(&layout, Some("2")).unwrap();
        assert_eq!(current_release(&layout).unwrap().as_deref(), Some("2"));
        assert_eq!(
            fs::read_to_string(layout.current_link().join("version.txt")).unwrap(),
            "2"
        );
        assert!(!layout.root().join(".current.tmp").exists());
        point_current(&layout, None).unwrap();
        assert_eq!(current_release(&layout).unwrap(), None);
    }

    #[test]
    fn a_current_link_to_a_partial_or_missing_release_is_not_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let layout = AppLayout::new(dir.path());
        fs::create_dir_all(layout.partial_dir("3")).unwrap();
        std::os::unix::fs::symlink("releases/.3.partial", layout.current_link()).unwrap();
        assert_eq!(current_release(&layout).unwrap(), None);
        point_current(&layout, Some("4")).unwrap();
        assert_eq!(
            current_release(&layout).unwrap(),
            None,
            "4 was never unpacked"
        );
    }

    #[test]
    fn prune_keeps_only_what_it_is_told() {
        let dir = tempfile::tempdir().unwrap();
        let layout = AppLayout::new(dir.path());
        for v in ["1", "2", "3"] {
            fs::create_dir_all(layout.release_dir(v)).unwrap();
        }
        fs::create_dir_all(layout.partial_dir("4")).unwrap();
        prune(&layout, &["3", "2"]).unwrap();
        let mut left: Vec<_> = fs::read_dir(layout.releases_dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, vec!["2", "3"]);
    }

    fn hooks(dir: &Path, health: Option<&str>) -> Hooks {
        Hooks {
            config: AppConfig {
                root: None,
                stop: Some("echo stop $DROVER_RELEASE >> ../../log".into()),
                start: Some(
                    "echo start $DROVER_RELEASE $(basename $DROVER_RELEASE_DIR) >> ../../log"
                        .into(),
                ),
                health: health.map(str::to_string),
                reload: None,
                health_window: Duration::from_millis(600),
                health_interval: Duration::from_millis(50),
                command_timeout: Duration::from_secs(10),
            },
            apps_root: dir.join("apps"),
            config_json: "{}".into(),
            config_file: dir.join("config.json"),
            log: dir.join("cmd.log"),
        }
    }

    #[tokio::test]
    async fn commands_run_in_the_release_directory_with_its_environment() {
        let dir = tempfile::tempdir().unwrap();
        let layout = AppLayout::new(dir.path());
        fs::create_dir_all(layout.release_dir("1")).unwrap();
        let hooks = hooks(dir.path(), None);
        let cancel = CancellationToken::new();
        let started = hooks
            .run(Hook::Start, Some("1"), &layout.release_dir("1"), &cancel)
            .await
            .unwrap();
        assert!(started.ok, "{started:?}");
        let stopped = hooks
            .run(Hook::Stop, Some("1"), &layout.release_dir("1"), &cancel)
            .await
            .unwrap();
        assert!(stopped.ok);
        assert_eq!(
            fs::read_to_string(dir.path().join("log")).unwrap(),
            "start 1 1\nstop 1\n"
        );
        let health = hooks
            .health("1", &layout.release_dir("1"), &cancel)
            .await
            .unwrap();
        assert!(health.ok, "no health command means healthy");
    }

    #[tokio::test]
    async fn health_passes_once_the_check_succeeds_within_the_window() {
        let dir = tempfile::tempdir().unwrap();
        // Fails twice, then passes: counts its runs in a file.
        let line = "n=$(cat count 2>/dev/null || echo 0); n=$((n+1)); echo $n > count; \
                    echo check $n; [ $n -ge 3 ]";
        let mut hooks = hooks(dir.path(), Some(line));
        hooks.config.health_window = Duration::from_secs(30);
        let result = hooks
            .health("1", dir.path(), &CancellationToken::new())
            .await
            .unwrap();
        assert!(result.ok, "{result:?}");
        assert_eq!(result.output, "check 3\n");
    }

    #[tokio::test]
    async fn health_fails_after_the_window_with_the_last_output() {
        let dir = tempfile::tempdir().unwrap();
        let hooks = hooks(dir.path(), Some("echo not yet; exit 1"));
        let result = hooks
            .health("1", dir.path(), &CancellationToken::new())
            .await
            .unwrap();
        assert!(!result.ok);
        assert!(!result.cancelled);
        assert_eq!(result.output, "not yet\n");
        assert!(
            result.message.contains("did not pass within 600ms"),
            "{}",
            result.message
        );
    }
}
