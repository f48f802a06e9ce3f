//! Walks an update attempt through its steps, persisting each before it starts, and resumes an
//! attempt found in `state.json` after a crash.
//!
//! Steps and what resuming each means (entering [`drive`] with a step *is* crash recovery):
//!
//! | step (persisted)  | what it does                                   | found after a restart    |
//! |-------------------|------------------------------------------------|--------------------------|
//! | `downloading`     | resumable download, size/hash/signature check  | resume the download      |
//! | `unpacking`       | re-verify the file, unpack via a partial dir   | discard partial, redo    |
//! | `script_running`  | run `update.sh`                                | outcome unknown: failure |
//! | `stopping`        | run the old release's stop command             | run it again, go on      |
//! | `swapping`        | point `current` at the new release             | swap again, go on        |
//! | `starting`        | run the new release's start command            | start again, go on       |
//! | `health_checking` | health check until it passes or the window ends| start again, full window |
//! | `rolling_back`    | stop new, point `current` back, start old      | do the rollback again    |
//! | `finished`        | outcome recorded (and committed on success)    | write the reports        |
//!
//! The release reported as current is always the committed one, and committing (setting
//! `current` in state.json) happens in the same atomic write that enters `finished`, so what the
//! hub is told always matches what is installed.

use std::sync::{Arc, Mutex, MutexGuard};

use drover_protocol::MAX_MESSAGE_BYTES;
use drover_protocol::artifact::ArtifactFormat;
use drover_protocol::device::{Module, ReportState, truncate_output};
use drover_protocol::signing::ReleasePublicKey;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::app::{self, AppLayout, Hook, Hooks};
use crate::client::HubClient;
use crate::config::AgentConfig;
use crate::crash::{CrashPoint, CrashPoints};
use crate::device_config;
use crate::download::{self, DownloadError, Downloader};
use crate::fsutil::{self, FileError};
use crate::layout::StateDir;
use crate::outbox::{Outbox, ReportDraft, now_ms};
use crate::schedule;
use crate::script::{self, ScriptEnv};
use crate::update::state::{Attempt, FailureRecord, Installed, Outcome, StateStore, Step};

/// Everything the update task needs. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Context {
    /// The agent config.
    pub config: Arc<AgentConfig>,
    /// The state directory.
    pub paths: StateDir,
    /// The hub.
    pub client: HubClient,
    /// The device credential (`None` before enrolment: downloads wait, local recovery does not).
    pub credential: Option<String>,
    /// The release key signatures are checked with.
    pub release_key: Option<ReleasePublicKey>,
    /// `state.json`.
    pub store: Arc<Mutex<StateStore>>,
    /// The outbox.
    pub outbox: Arc<Mutex<Outbox>>,
    /// Woken when a report was added to the outbox.
    pub outbox_changed: Arc<Notify>,
    /// Test crash hooks.
    pub crash: CrashPoints,
    /// Cancelled when the agent shuts down: stops whatever step is running.
    pub cancel: CancellationToken,
    /// Cancelled when the target changed while downloading: stops only a download (an install
    /// that has begun is always finished).
    pub cancel_download: CancellationToken,
}

/// How a run of the task ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunEnd {
    /// The attempt is over (whatever its outcome) or there was none.
    Finished,
    /// Could not go on for now (network, no credential yet); try again later. No failure counted.
    Deferred(String),
    /// Stopped for shutdown or because the target changed; the attempt stays where it was.
    Cancelled,
}

/// A local problem that stopped the task; the attempt stays where it was and is retried later.
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    /// A state file could not be written or read.
    #[error(transparent)]
    File(#[from] FileError),
    /// A blocking job panicked.
    #[error("an unpacking job crashed: {0}")]
    Panicked(String),
}

/// What a step leads to.
enum Next {
    Step(Step),
    Deferred(String),
    Cancelled,
}

impl Context {
    fn store(&self) -> MutexGuard<'_, StateStore> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn layout(&self) -> AppLayout {
        AppLayout::new(self.config.app_root())
    }

    fn hooks(&self, attempt: &Attempt) -> Hooks {
        Hooks {
            config: self.config.app.clone(),
            apps_root: self.config.apps_root(),
            config_json: device_config::config_text(&attempt.config),
            config_file: self.paths.config_json(),
            log: self.paths.work_dir().join(".command.log"),
        }
    }

    fn report(
        &self,
        attempt: &Attempt,
        state: ReportState,
        message: Option<String>,
        output: Option<String>,
    ) -> Result<(), FileError> {
        let draft = ReportDraft {
            release: attempt.offer.version.clone(),
            attempt: attempt.number,
            state,
            message,
            output: output.filter(|o| !o.is_empty()),
        };
        self.outbox
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(draft)?;
        self.outbox_changed.notify_one();
        Ok(())
    }

    fn persist_step(&self, attempt: &mut Attempt, step: Step) -> Result<(), FileError> {
        attempt.step = step;
        let saved = attempt.clone();
        self.store().update(|s| s.attempt = Some(saved))
    }
}

/// Records a new attempt and reports that it began.
pub fn begin(ctx: &Context, attempt: &Attempt) -> Result<(), FileError> {
    let saved = attempt.clone();
    ctx.store().update(|s| {
        s.record_try(&saved.offer.version, saved.number);
        s.attempt = Some(saved);
    })?;
    tracing::info!(release = %attempt.offer.version, attempt = attempt.number, "update begins");
    ctx.report(
        attempt,
        ReportState::Downloading,
        Some(format!(
            "attempt {} at release {}",
            attempt.number, attempt.offer.version
        )),
        None,
    )
}

/// Drives the attempt in `state.json` from its persisted step to its end.
pub async fn drive(ctx: &Context) -> Result<RunEnd, UpdateError> {
    let Some(mut attempt) = ctx.store().get().attempt.clone() else {
        return Ok(RunEnd::Finished);
    };
    let entry = match &attempt.step {
        // The start command may not have run, or may have been killed with the agent; a health
        // window is only meaningful when it follows a start, so both are redone.
        Step::HealthChecking => Step::Starting,
        Step::ScriptRunning => Step::Finished {
            outcome: Outcome::Failure {
                message: "the agent restarted while update.sh was running, so its outcome is \
                          unknown; the attempt counts as failed"
                    .into(),
                output: String::new(),
            },
        },
        other => other.clone(),
    };
    if entry != attempt.step {
        tracing::warn!(release = %attempt.offer.version, step = attempt.step.name(), resume_at = entry.name(), "resuming an interrupted update");
        enter(ctx, &mut attempt, entry)?;
    }
    loop {
        let next = match attempt.step.clone() {
            Step::Downloading => download(ctx, &attempt).await?,
            Step::Unpacking => unpack(ctx, &mut attempt).await?,
            Step::ScriptRunning => run_script(ctx, &attempt).await?,
            Step::Stopping => stop_old(ctx, &attempt).await?,
            Step::Swapping => swap(ctx, &attempt),
            Step::Starting => start_new(ctx, &attempt).await?,
            Step::HealthChecking => health(ctx, &attempt).await?,
            Step::RollingBack { message, output } => {
                roll_back(ctx, &attempt, message, output).await?
            }
            Step::Finished { outcome } => {
                finish(ctx, &attempt, &outcome)?;
                return Ok(RunEnd::Finished);
            }
        };
        match next {
            Next::Step(step) => enter(ctx, &mut attempt, step)?,
            Next::Deferred(why) => return Ok(RunEnd::Deferred(why)),
            Next::Cancelled => return Ok(RunEnd::Cancelled),
        }
    }
}

/// Persists the next step. Entering `finished` also commits a success or counts a failure, in
/// the same write.
fn enter(ctx: &Context, attempt: &mut Attempt, step: Step) -> Result<(), FileError> {
    let Step::Finished { outcome } = &step else {
        return ctx.persist_step(attempt, step);
    };
    attempt.step = step.clone();
    let saved = attempt.clone();
    let retry = ctx.config.retry.clone();
    let now = now_ms();
    ctx.store().update(|s| {
        let version = saved.offer.version.clone();
        match outcome {
            Outcome::Success { .. } => {
                if saved.offer.module == Module::App {
                    s.previous_app = saved.old_app.clone();
                }
                s.current = Some(Installed {
                    version,
                    module: saved.offer.module,
                });
                s.failures = None;
            }
            Outcome::Failure { message, .. } | Outcome::RolledBack { message, .. } => {
                let failures = s.failures_of(&version).map_or(0, |f| f.failures) + 1;
                let delay = schedule::retry_delay(failures, &retry);
                s.failures = Some(FailureRecord {
                    release: version,
                    failures,
                    retry_at_ms: now
                        .saturating_add(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX)),
                    held: schedule::is_held(failures, &retry),
                    last_error: truncate_output(message, MAX_MESSAGE_BYTES),
                });
            }
        }
        s.attempt = Some(saved);
    })
}

fn failed(message: impl Into<String>, output: impl Into<String>) -> Next {
    Next::Step(Step::Finished {
        outcome: Outcome::Failure {
            message: message.into(),
            output: output.into(),
        },
    })
}

fn rolling_back(message: impl Into<String>, output: impl Into<String>) -> Next {
    Next::Step(Step::RollingBack {
        message: message.into(),
        output: output.into(),
    })
}

async fn download(ctx: &Context, attempt: &Attempt) -> Result<Next, UpdateError> {
    let offer = &attempt.offer;
    if let Err(message) =
        download::check_offer(offer, ctx.release_key.as_ref(), &ctx.config.device_type)
    {
        return Ok(failed(message, ""));
    }
    let Some(credential) = &ctx.credential else {
        return Ok(Next::Deferred("the device is not enrolled yet".into()));
    };
    let downloads = ctx.paths.downloads_dir();
    let downloader = Downloader {
        client: &ctx.client,
        credential,
        dir: &downloads,
        crash: &ctx.crash,
        cancel: &ctx.cancel_download,
    };
    match downloader.fetch(offer).await {
        Ok(_) => {
            ctx.report(
                attempt,
                ReportState::Installing,
                Some(format!(
                    "verified {} bytes (sha256 {}) and the release signature; installing with the {} module",
                    offer.size,
                    offer.sha256,
                    offer.module.as_str()
                )),
                None,
            )?;
            Ok(Next::Step(Step::Unpacking))
        }
        Err(DownloadError::Transient(why)) => Ok(Next::Deferred(why)),
        Err(DownloadError::Rejected(why)) => Ok(failed(why, "")),
        Err(DownloadError::Cancelled) => Ok(Next::Cancelled),
        Err(DownloadError::File(e)) => Err(e.into()),
    }
}

async fn unpack(ctx: &Context, attempt: &mut Attempt) -> Result<Next, UpdateError> {
    let offer = attempt.offer.clone();
    let verified = download::verified_path(&ctx.paths.downloads_dir(), &offer.sha256);
    // The verified file may have sat on an SD card across a power cut: check it again, and
    // fetch it again if it is gone or damaged.
    if !verified.exists() || !download::file_matches(&verified, &offer.sha256, offer.size).await? {
        fsutil::remove_if_exists(&verified)?;
        tracing::warn!(release = %offer.version, "the verified download is missing or damaged; downloading again");
        return Ok(Next::Step(Step::Downloading));
    }
    let format = match sniff(&verified)? {
        Some(ArtifactFormat::NodeScript) => {
            return Ok(failed(
                "the artifact is a node script; drover-agent runs shell scripts and tar.gz or zip \
                 archives only (wrap it in an update.sh that calls node)",
                "",
            ));
        }
        Some(format) => format,
        None => {
            return Ok(failed(
                "the artifact is neither a tar.gz or zip archive nor a shell script starting with #!",
                "",
            ));
        }
    };
    match offer.module {
        Module::Script => {
            let work = ctx.paths.work_dir();
            let version = offer.version.clone();
            let prepared =
                blocking(move || script::prepare(format, &verified, &work, &version)).await?;
            if let Err(e) = prepared {
                return Ok(failed(e.to_string(), ""));
            }
            ctx.crash.hit(CrashPoint::Unpacked);
            Ok(Next::Step(Step::ScriptRunning))
        }
        Module::App => {
            if !format.is_archive() {
                return Ok(failed(
                    "the app module needs a tar.gz or zip archive, but this artifact is a bare script",
                    "",
                ));
            }
            let layout = ctx.layout();
            let version = offer.version.clone();
            let job_layout = layout.clone();
            let unpacked =
                blocking(move || app::unpack_release(&job_layout, format, &verified, &version))
                    .await?;
            if let Err(e) = unpacked {
                return Ok(failed(e.to_string(), ""));
            }
            ctx.crash.hit(CrashPoint::Unpacked);
            // Recorded now, before anything is stopped: the rollback target.
            attempt.old_app = app::current_release(&layout)?.filter(|old| *old != offer.version);
            Ok(Next::Step(Step::Stopping))
        }
    }
}

async fn run_script(ctx: &Context, attempt: &Attempt) -> Result<Next, UpdateError> {
    let (folder, _) = script::work_dirs(&ctx.paths.work_dir(), &attempt.offer.version);
    let script_path = match script::find_script(&folder) {
        Ok(path) => path,
        Err(e) => return Ok(failed(e.to_string(), "")),
    };
    let env = ScriptEnv {
        release: attempt.offer.version.clone(),
        apps_root: ctx.config.apps_root(),
        config_json: device_config::config_text(&attempt.config),
        config_file: ctx.paths.config_json(),
    };
    fsutil::create_dir_all(&env.apps_root, 0o755)?;
    let timeout = ctx.config.script.effective_timeout();
    tracing::info!(release = %attempt.offer.version, script = %script_path.display(), "running update.sh");
    let log = ctx.paths.work_dir().join(".update.log");
    let finished = match script::run(&script_path, &env, timeout, log, &ctx.cancel).await {
        Ok(finished) => finished,
        Err(e) => return Ok(failed(e.to_string(), "")),
    };
    if finished.ending == crate::process::Ending::Cancelled {
        return Ok(Next::Cancelled);
    }
    let message = finished.describe("update.sh", timeout);
    if finished.success() {
        Ok(Next::Step(Step::Finished {
            outcome: Outcome::Success {
                output: finished.output,
            },
        }))
    } else {
        Ok(failed(message, finished.output))
    }
}

async fn stop_old(ctx: &Context, attempt: &Attempt) -> Result<Next, UpdateError> {
    // On a first install there is no release of ours to stop.
    if let Some(old) = attempt.old_app.as_deref() {
        let dir = ctx.layout().release_dir(old);
        let result = ctx
            .hooks(attempt)
            .run(Hook::Stop, Some(old), &dir, &ctx.cancel)
            .await;
        match result {
            Ok(r) if r.cancelled => return Ok(Next::Cancelled),
            Ok(r) if !r.ok => {
                // The old release may simply not be running. Go on: the health check decides.
                tracing::warn!(release = %old, why = %r.message, output = %r.output, "the stop command failed");
            }
            Ok(_) => {}
            Err(e) => return Ok(rolling_back(e.to_string(), "")),
        }
    }
    ctx.crash.hit(CrashPoint::Stopped);
    Ok(Next::Step(Step::Swapping))
}

fn swap(ctx: &Context, attempt: &Attempt) -> Next {
    if let Err(e) = app::point_current(&ctx.layout(), Some(&attempt.offer.version)) {
        return rolling_back(format!("cannot swap the current symlink: {e}"), "");
    }
    ctx.crash.hit(CrashPoint::Swapped);
    Next::Step(Step::Starting)
}

async fn start_new(ctx: &Context, attempt: &Attempt) -> Result<Next, UpdateError> {
    let version = &attempt.offer.version;
    let dir = ctx.layout().release_dir(version);
    match ctx
        .hooks(attempt)
        .run(Hook::Start, Some(version), &dir, &ctx.cancel)
        .await
    {
        Ok(r) if r.cancelled => Ok(Next::Cancelled),
        Ok(r) if !r.ok => Ok(rolling_back(r.message, r.output)),
        Ok(_) => {
            ctx.crash.hit(CrashPoint::Started);
            Ok(Next::Step(Step::HealthChecking))
        }
        Err(e) => Ok(rolling_back(e.to_string(), "")),
    }
}

async fn health(ctx: &Context, attempt: &Attempt) -> Result<Next, UpdateError> {
    let version = &attempt.offer.version;
    let dir = ctx.layout().release_dir(version);
    match ctx.hooks(attempt).health(version, &dir, &ctx.cancel).await {
        Ok(r) if r.cancelled => Ok(Next::Cancelled),
        Ok(r) if r.ok => Ok(Next::Step(Step::Finished {
            outcome: Outcome::Success { output: r.output },
        })),
        Ok(r) => Ok(rolling_back(r.message, r.output)),
        Err(e) => Ok(rolling_back(e.to_string(), "")),
    }
}

async fn roll_back(
    ctx: &Context,
    attempt: &Attempt,
    message: String,
    mut output: String,
) -> Result<Next, UpdateError> {
    let layout = ctx.layout();
    let hooks = ctx.hooks(attempt);
    let version = &attempt.offer.version;
    tracing::warn!(release = %version, why = %message, "rolling back");
    let mut notes = Vec::new();
    let stopped = hooks
        .run(
            Hook::Stop,
            Some(version),
            &layout.release_dir(version),
            &ctx.cancel,
        )
        .await;
    match stopped {
        Ok(r) if r.cancelled => return Ok(Next::Cancelled),
        Ok(r) if !r.ok => notes.push(format!("stopping the new release: {}", r.message)),
        Ok(_) => {}
        Err(e) => notes.push(format!("stopping the new release: {e}")),
    }
    // Go back to the old release only if it is still complete on disk.
    let old = attempt
        .old_app
        .as_deref()
        .filter(|v| layout.release_dir(v).is_dir());
    app::point_current(&layout, old)?;
    if let Some(old) = old {
        let started = hooks
            .run(
                Hook::Start,
                Some(old),
                &layout.release_dir(old),
                &ctx.cancel,
            )
            .await;
        match started {
            Ok(r) if r.cancelled => return Ok(Next::Cancelled),
            Ok(r) if !r.ok => {
                notes.push(format!(
                    "starting the previous release {old}: {}",
                    r.message
                ));
                output.push_str(&format!(
                    "\n--- output of the start command of the previous release {old} ---\n{}",
                    r.output
                ));
            }
            Ok(_) => {}
            Err(e) => notes.push(format!("starting the previous release {old}: {e}")),
        }
    }
    ctx.crash.hit(CrashPoint::RolledBack);
    let restored = match old {
        Some(old) => format!("release {old} was restored"),
        None => "there was no previous release, so none is current now".to_string(),
    };
    let mut message = format!("{message}; {restored}");
    for note in notes {
        message.push_str("; rollback trouble: ");
        message.push_str(&note);
    }
    Ok(Next::Step(Step::Finished {
        outcome: Outcome::RolledBack { message, output },
    }))
}

/// Writes the outcome's reports, clears the attempt and tidies up.
fn finish(ctx: &Context, attempt: &Attempt, outcome: &Outcome) -> Result<(), FileError> {
    let version = &attempt.offer.version;
    match outcome {
        Outcome::Success { output } => {
            ctx.crash.hit(CrashPoint::Committed);
            tracing::info!(release = %version, "update committed");
            ctx.report(
                attempt,
                ReportState::Success,
                Some(format!("release {version} is installed")),
                Some(output.clone()),
            )?;
        }
        Outcome::Failure { message, output } | Outcome::RolledBack { message, output } => {
            let state = if matches!(outcome, Outcome::Failure { .. }) {
                ReportState::Failure
            } else {
                ReportState::RolledBack
            };
            tracing::warn!(release = %version, why = %message, "update failed");
            ctx.report(attempt, state, Some(message.clone()), Some(output.clone()))?;
            let record = ctx.store().get().failures_of(version).cloned();
            if let Some(record) = record.filter(|r| r.held) {
                tracing::error!(release = %version, failures = record.failures, "release held until an operator asks for a retry");
                ctx.report(
                    attempt,
                    ReportState::Held,
                    Some(format!(
                        "release {version} failed {} times and is held until an operator asks \
                         for a retry; last error: {}",
                        record.failures, record.last_error
                    )),
                    None,
                )?;
            }
        }
    }
    ctx.store().update(|s| s.attempt = None)?;
    tidy(ctx, attempt, matches!(outcome, Outcome::Success { .. }))
}

/// Removes what the attempt no longer needs: the script's unpack directory, old app releases,
/// and downloads. After a failure the verified download of the target is kept, so that a retry
/// does not fetch it again over a metered link.
fn tidy(ctx: &Context, attempt: &Attempt, success: bool) -> Result<(), FileError> {
    let (done, partial) = script::work_dirs(&ctx.paths.work_dir(), &attempt.offer.version);
    fsutil::remove_if_exists(&partial)?;
    fsutil::remove_if_exists(&done)?;
    let keep = (!success).then_some(attempt.offer.sha256.as_str());
    download::remove_stale(&ctx.paths.downloads_dir(), keep)?;
    if attempt.offer.module == Module::App && success {
        let state = ctx.store().get().clone();
        let mut keep: Vec<&str> = Vec::new();
        keep.extend(state.current_version());
        keep.extend(state.previous_app.as_deref());
        app::prune(&ctx.layout(), &keep)?;
    }
    Ok(())
}

fn sniff(path: &std::path::Path) -> Result<Option<ArtifactFormat>, FileError> {
    use std::io::Read as _;
    let mut head = Vec::with_capacity(512);
    std::fs::File::open(path)
        .and_then(|f| f.take(512).read_to_end(&mut head))
        .map_err(|e| FileError::new("reading", path, e))?;
    Ok(ArtifactFormat::sniff(&head))
}

async fn blocking<T: Send + 'static>(
    job: impl FnOnce() -> T + Send + 'static,
) -> Result<T, UpdateError> {
    tokio::task::spawn_blocking(job)
        .await
        .map_err(|e| UpdateError::Panicked(e.to_string()))
}
