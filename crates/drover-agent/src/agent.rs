//! The agent's main loop: check in with the hub, deliver reports, and start update attempts as
//! their own task, so that check-ins go on while an update installs (the seed updater froze for
//! up to an hour while a script ran).
//!
//! Everything that can wake the loop is one `Event`: shutdown, a due check-in, a due update
//! retry, the update task ending, the reload command ending, and new reports in the outbox.
//!
//! A new desired config is written to `config.json` at once; when it came without a new release
//! to install, `[app] reload` runs (see [`crate::device_config`]). The reload command and an
//! update never run at the same time.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::Context as _;
use drover_protocol::device::{
    CheckinRequest, DesiredState, DeviceStatus, MAX_REPORTS_PER_BATCH, Module, ReportBatch,
};
use drover_protocol::signing::ReleaseSigningKey;
use reqwest::StatusCode;
use tokio::sync::{Notify, watch};
use tokio::task::{JoinError, JoinHandle};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::app::{self, AppLayout};
use crate::client::{HubClient, HubError};
use crate::config::{AgentConfig, HARD_MIN_INTERVAL};
use crate::crash::CrashPoints;
use crate::device_config;
use crate::facts::{self, FactsTracker};
use crate::fsutil::{self, FileError};
use crate::identity::{self, Enrolment, IdentityError};
use crate::layout::StateDir;
use crate::outbox::{Outbox, now_ms};
use crate::schedule;
use crate::sender::{Enrolled, Telemetry};
use crate::telemetry::start_telemetry;
use crate::update::runner::{self, RunEnd, UpdateError};
use crate::update::state::{Installed, StateStore};
use crate::update::{self, Plan};

/// Runs the agent until `shutdown` is cancelled.
///
/// Reads the test hook `DROVER_AGENT_CRASH_AT` once (see [`crate::crash`]). Returns an error
/// only for problems that retrying cannot fix: an invalid config, an unusable state directory,
/// a damaged identity key, or no way to enrol.
pub async fn run(config: AgentConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    config.validate().context("checking the agent config")?;
    let agent = Agent::open(config, CrashPoints::from_env())?;
    agent.run(shutdown).await
}

/// What woke the main loop.
enum Event {
    /// Stop.
    Shutdown,
    /// Time to check in.
    PollDue,
    /// A backed-off update may be tried again.
    UpdateDue,
    /// The update task ended.
    UpdateDone(Result<Result<RunEnd, UpdateError>, JoinError>),
    /// The reload command ended.
    ReloadDone,
    /// Reports were added to the outbox.
    ReportsWaiting,
}

/// Why a check-in cycle did not complete.
#[derive(Debug, thiserror::Error)]
enum PollError {
    /// The device waits for an operator to accept it.
    #[error("the device is waiting for an operator to accept it")]
    Pending,
    /// The device's credential was revoked.
    #[error("the device was revoked by an operator; it will not enrol again with this identity")]
    Revoked,
    /// The hub refused or could not be reached.
    #[error(transparent)]
    Hub(#[from] HubError),
    /// Enrolment failed.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// A state file could not be written.
    #[error(transparent)]
    File(#[from] FileError),
}

/// The running update task.
struct Task {
    handle: JoinHandle<Result<RunEnd, UpdateError>>,
    cancel_download: CancellationToken,
}

struct Agent {
    config: Arc<AgentConfig>,
    paths: StateDir,
    client: HubClient,
    identity: ReleaseSigningKey,
    enrolment: Option<Enrolment>,
    store: Arc<Mutex<StateStore>>,
    outbox: Arc<Mutex<Outbox>>,
    outbox_changed: Arc<Notify>,
    desired: Option<DesiredState>,
    crash: CrashPoints,
    task: Option<Task>,
    /// The `[app] reload` command, while it runs.
    reload: Option<JoinHandle<()>>,
    /// The config changed without a new app release to carry it; reload when nothing else runs.
    reload_due: bool,
    next_poll: Instant,
    poll_errors: u32,
    update_retry_at: Option<Instant>,
    update_deferrals: u32,
    facts: FactsTracker,
    release_key_refreshed: bool,
    pending_logged: bool,
    /// Who the device is, for the sender: set after a successful check-in, cleared while the
    /// device is pending, revoked or its credential refused.
    enrolled: watch::Sender<Option<Enrolled>>,
    /// The telemetry path's figures, reported in check-ins.
    telemetry: Option<Telemetry>,
}

impl Agent {
    fn open(config: AgentConfig, crash: CrashPoints) -> anyhow::Result<Agent> {
        let paths = StateDir::new(&config.state_dir);
        paths
            .create()
            .with_context(|| format!("preparing the state directory {}", paths.root().display()))?;
        let identity = identity::load_or_create_key(&paths)?;
        let enrolment = identity::load_enrolment(&paths)?;
        if enrolment.is_none() && config.provisioning_key.is_none() {
            return Err(IdentityError::NoProvisioningKey.into());
        }
        let client = HubClient::new(&config)?;
        let store = StateStore::open(&paths.state_json())?;
        let outbox = Outbox::open(&paths.outbox_dir())?;
        let desired = fsutil::read_json::<DesiredState>(&paths.desired_json())?;
        let config_now = desired
            .as_ref()
            .map_or(&serde_json::Value::Null, |d| &d.config);
        device_config::write_if_missing(&paths.config_json(), config_now)?;
        Ok(Agent {
            config: Arc::new(config),
            paths,
            client,
            identity,
            enrolment,
            store: Arc::new(Mutex::new(store)),
            outbox: Arc::new(Mutex::new(outbox)),
            outbox_changed: Arc::new(Notify::new()),
            desired,
            crash,
            task: None,
            reload: None,
            reload_due: false,
            next_poll: Instant::now(),
            poll_errors: 0,
            update_retry_at: None,
            update_deferrals: 0,
            facts: FactsTracker::default(),
            release_key_refreshed: false,
            pending_logged: false,
            enrolled: watch::Sender::new(None),
            telemetry: None,
        })
    }

    async fn run(mut self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let device = self
            .enrolment
            .as_ref()
            .map(|e| e.device.device_id.to_string());
        tracing::info!(device = ?device, state_dir = %self.paths.root().display(), "drover-agent starting");
        self.reconcile_app_link()
            .context("reconciling the app's current symlink with state.json")?;
        self.settle_after_restart()
            .context("tidying the state directory")?;
        let telemetry = start_telemetry(
            &self.config,
            &self.paths,
            &self.client,
            self.enrolled.subscribe(),
            &shutdown,
        );
        self.telemetry = telemetry.telemetry.clone();
        // An update interrupted by a crash is finished (or rolled back) at once, hub or not.
        self.maybe_start_update(&shutdown);
        loop {
            match self.next_event(&shutdown).await {
                Event::Shutdown => {
                    self.stop_task().await;
                    // The sources save their state (S0 counts) as they stop.
                    telemetry.join().await;
                    tracing::info!("drover-agent stopped");
                    return Ok(());
                }
                Event::PollDue => {
                    tokio::select! {
                        () = shutdown.cancelled() => {}
                        () = self.poll(&shutdown) => {}
                    }
                }
                Event::UpdateDue => {
                    self.update_retry_at = None;
                    self.maybe_start_update(&shutdown);
                }
                Event::UpdateDone(result) => self.update_done(result, &shutdown),
                Event::ReloadDone => {
                    self.reload = None;
                    self.maybe_start_update(&shutdown);
                    self.maybe_reload(&shutdown);
                }
                Event::ReportsWaiting => {
                    tokio::select! {
                        () = shutdown.cancelled() => {}
                        result = self.flush_reports() => if let Err(e) = result {
                            tracing::debug!(error = %e, "reports wait for the next check-in");
                        },
                    }
                }
            }
        }
    }

    async fn next_event(&mut self, shutdown: &CancellationToken) -> Event {
        let next_poll = self.next_poll;
        let retry_at = self.update_retry_at;
        let outbox_changed = self.outbox_changed.clone();
        let task = &mut self.task;
        let reload = &mut self.reload;
        tokio::select! {
            biased;
            () = shutdown.cancelled() => Event::Shutdown,
            result = async {
                match task {
                    Some(task) => (&mut task.handle).await,
                    None => std::future::pending().await,
                }
            } => Event::UpdateDone(result),
            _ = async {
                match reload {
                    Some(handle) => handle.await,
                    None => std::future::pending().await,
                }
            } => Event::ReloadDone,
            () = tokio::time::sleep_until(next_poll) => Event::PollDue,
            () = async {
                match retry_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => Event::UpdateDue,
            () = outbox_changed.notified() => Event::ReportsWaiting,
        }
    }

    fn store(&self) -> MutexGuard<'_, StateStore> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    // ----- check-ins -----

    async fn poll(&mut self, shutdown: &CancellationToken) {
        let poll = self.config.poll.clone();
        let (wait, floor) = match self.check_in(shutdown).await {
            Ok(()) => {
                self.poll_errors = 0;
                self.pending_logged = false;
                (self.normal_interval(), poll.min_interval)
            }
            Err(PollError::Pending) => {
                if !self.pending_logged {
                    tracing::info!(
                        "waiting for an operator to accept this device (drover device accept)"
                    );
                    self.pending_logged = true;
                }
                (self.normal_interval(), poll.min_interval)
            }
            Err(PollError::Revoked) => {
                tracing::error!(
                    "this device was revoked; it asks again only every {}",
                    crate::duration::format_duration(poll.max_interval)
                );
                (poll.max_interval, poll.min_interval)
            }
            Err(e) => {
                self.poll_errors = self.poll_errors.saturating_add(1);
                let wait = schedule::error_backoff(self.poll_errors, &poll);
                tracing::warn!(error = %e, retry_in = ?wait, "check-in failed");
                (wait, HARD_MIN_INTERVAL)
            }
        };
        self.next_poll = Instant::now() + schedule::jittered(wait, floor);
    }

    fn normal_interval(&self) -> Duration {
        let hub = self.desired.as_ref().map(|d| d.poll_interval_s);
        schedule::poll_interval(hub, &self.config.poll)
    }

    async fn check_in(&mut self, shutdown: &CancellationToken) -> Result<(), PollError> {
        let enrolment = self.ensure_enrolled().await?;
        if let Err(e) = self.flush_reports().await {
            tracing::debug!(error = %e, "reports not delivered before the check-in");
        }
        let facts = facts::collect(&self.config);
        let send_facts = self.facts.due(&facts, Instant::now().into_std());
        let request = {
            let store = self.store();
            CheckinRequest {
                protocol: drover_protocol::PROTOCOL_VERSION,
                desired_etag: self.desired.as_ref().map(|d| d.etag.clone()),
                current_release: store.get().current_version().map(str::to_string),
                agent_version: crate::AGENT_VERSION.to_string(),
                update: store.get().status(now_ms()),
                facts: send_facts.then(|| facts.clone()),
                telemetry: self.telemetry.as_ref().map(Telemetry::status),
            }
        };
        let answer = self.client.checkin(&enrolment.credential, &request).await;
        let answer = match answer {
            Ok(answer) => answer,
            Err(e) => return Err(self.classify_refusal(e)?),
        };
        if send_facts {
            self.facts.sent(facts, Instant::now().into_std());
        }
        self.publish_enrolment(Some(&enrolment));
        if let Some(desired) = answer {
            self.apply_desired(desired)?;
            self.refresh_release_key_if_needed().await;
        }
        self.maybe_start_update(shutdown);
        self.maybe_reload(shutdown);
        Ok(())
    }

    /// Tells the sender who the device is (or that it may not send now).
    fn publish_enrolment(&self, enrolment: Option<&Enrolment>) {
        let enrolled = enrolment.map(|e| Enrolled {
            device: e.device.device_id.clone(),
            credential: e.credential.clone(),
        });
        self.enrolled.send_if_modified(|current| {
            let changed = *current != enrolled;
            *current = enrolled;
            changed
        });
    }

    /// Turns a refused check-in into what the loop should do.
    fn classify_refusal(&mut self, e: HubError) -> Result<PollError, PollError> {
        let result = self.classify(e);
        if matches!(result, Ok(PollError::Pending | PollError::Revoked) | Err(_))
            || self.enrolment.is_none()
        {
            self.publish_enrolment(None);
        }
        result
    }

    fn classify(&mut self, e: HubError) -> Result<PollError, PollError> {
        match (e.status(), e.code()) {
            (Some(StatusCode::UNAUTHORIZED), _) => {
                // The hub does not know this credential (a restored hub, a rotated credential).
                // Enrolling again with the same key gets the same device ID and a new one.
                tracing::warn!(error = %e, "the hub refused the credential; enrolling again");
                identity::forget_credential(&self.paths)?;
                self.enrolment = None;
                Ok(PollError::Hub(e))
            }
            (Some(StatusCode::FORBIDDEN), Some("device_pending")) => Ok(PollError::Pending),
            (Some(StatusCode::FORBIDDEN), Some("device_revoked")) => Ok(PollError::Revoked),
            _ => Ok(PollError::Hub(e)),
        }
    }

    async fn ensure_enrolled(&mut self) -> Result<Enrolment, PollError> {
        if let Some(enrolment) = &self.enrolment {
            return Ok(enrolment.clone());
        }
        let facts = facts::collect(&self.config);
        let result = identity::enroll(
            &self.client,
            &self.config,
            &self.paths,
            &self.identity,
            facts,
        )
        .await;
        match result {
            Ok((enrolment, status)) => {
                self.enrolment = Some(enrolment.clone());
                if status == DeviceStatus::Pending {
                    tracing::info!(device = %enrolment.device.device_id, "enrolled; waiting for an operator to accept this device");
                }
                Ok(enrolment)
            }
            Err(IdentityError::Hub(e))
                if e.status() == Some(StatusCode::FORBIDDEN)
                    && e.code() == Some("device_revoked") =>
            {
                Err(PollError::Revoked)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Keeps the new desired state (on disk first, so a restart while offline still knows the
    /// target) and lets it reset failure counts. A changed config goes to `config.json` first:
    /// after a crash between the two writes the hub sends the state again, the change is seen
    /// again, and the reload runs then.
    fn apply_desired(&mut self, desired: DesiredState) -> Result<(), FileError> {
        let old_config = self
            .desired
            .as_ref()
            .map_or(&serde_json::Value::Null, |d| &d.config);
        if device_config::differs(old_config, &desired.config) {
            device_config::write(&self.paths.config_json(), &desired.config)?;
            self.reload_due = true;
        }
        fsutil::write_json_atomic(&self.paths.desired_json(), &desired, fsutil::PUBLIC)?;
        self.store().update(|s| s.apply_desired(&desired))?;
        let target = desired.release.as_ref().map(|r| r.version.as_str());
        tracing::info!(etag = %desired.etag, target = ?target, poll_interval_s = desired.poll_interval_s, "new desired state");
        // A download of a release that is no longer the target is abandoned; an install that
        // has begun is always finished.
        if let Some(task) = &self.task {
            let attempt = self.store().get().attempt.clone();
            if let Some(attempt) = attempt
                && desired.release.as_ref() != Some(&attempt.offer)
            {
                task.cancel_download.cancel();
            }
        }
        self.desired = Some(desired);
        // Whatever the loop was waiting for (a failed release's backoff, a paused download) may
        // no longer apply: a new target or retry generation is planned afresh.
        self.update_retry_at = None;
        Ok(())
    }

    /// A device that enrolled before its fleet had a release key cannot check signatures. If
    /// the config allows enrolling, do it once per run to learn the key (same device ID).
    async fn refresh_release_key_if_needed(&mut self) {
        let wants_release = self.desired.as_ref().is_some_and(|d| d.release.is_some());
        if !wants_release || self.release_key_refreshed || self.release_key().is_some() {
            return;
        }
        if self.config.provisioning_key.is_none() {
            return;
        }
        tracing::info!("no release key known yet; enrolling again to fetch the fleet's");
        let facts = facts::collect(&self.config);
        let result = identity::enroll(
            &self.client,
            &self.config,
            &self.paths,
            &self.identity,
            facts,
        )
        .await;
        match result {
            Ok((enrolment, _)) => {
                self.release_key_refreshed = true;
                self.enrolment = Some(enrolment);
            }
            Err(IdentityError::Hub(e)) if e.is_transient() => {
                tracing::warn!(error = %e, "could not fetch the release key; trying again at the next check-in");
            }
            Err(e) => {
                self.release_key_refreshed = true;
                tracing::warn!(error = %e, "could not fetch the release key");
            }
        }
    }

    fn release_key(&self) -> Option<drover_protocol::signing::ReleasePublicKey> {
        identity::release_key(&self.config, self.enrolment.as_ref().map(|e| &e.device))
    }

    // ----- reports -----

    /// Sends the outbox in batches, oldest first, deleting what the hub acknowledged.
    async fn flush_reports(&mut self) -> Result<(), PollError> {
        let Some(enrolment) = self.enrolment.clone() else {
            return Ok(());
        };
        loop {
            let reports = self
                .outbox
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .pending(MAX_REPORTS_PER_BATCH)?;
            let (Some(first), Some(last)) = (reports.first(), reports.last()) else {
                return Ok(());
            };
            let (first, last) = (first.seq, last.seq);
            let batch = ReportBatch {
                protocol: drover_protocol::PROTOCOL_VERSION,
                reports,
            };
            let acked = match self.client.reports(&enrolment.credential, &batch).await {
                Ok(ack) => ack.acked_through.min(last),
                Err(e)
                    if e.is_transient()
                        || matches!(
                            e.status(),
                            Some(StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN)
                        ) =>
                {
                    return Err(e.into());
                }
                Err(e) => {
                    // Any other 4xx means the hub will never take these reports as they are.
                    // Keeping them would block every later report forever, so this batch (and
                    // only this batch) is dropped, loudly.
                    tracing::error!(error = %e, first, last, "the hub refused a report batch; dropping it");
                    last
                }
            };
            if acked < first {
                return Ok(());
            }
            self.outbox
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove_through(acked)?;
            if acked < last {
                // The hub stored only part of the batch; the rest waits for the next round.
                return Ok(());
            }
        }
    }

    // ----- updates -----

    fn maybe_start_update(&mut self, shutdown: &CancellationToken) {
        if self.task.is_some() || self.update_retry_at.is_some() || self.reload.is_some() {
            return;
        }
        loop {
            let plan = update::plan(self.store().get(), self.desired.as_ref(), now_ms());
            match plan {
                Plan::Nothing | Plan::Held => return,
                Plan::WaitUntil(at_ms) => {
                    // Capped, in case the clock went back (a Raspberry Pi without a real-time
                    // clock boots with the time it shut down at).
                    let wait = Duration::from_millis(
                        u64::try_from(at_ms.saturating_sub(now_ms())).unwrap_or(0),
                    )
                    .min(self.config.retry.max_backoff);
                    self.update_retry_at = Some(Instant::now() + wait);
                    tracing::info!(retry_in = ?wait, "the target release failed recently; waiting before the next attempt");
                    return;
                }
                Plan::Discard => {
                    tracing::info!(
                        "the release being downloaded is no longer the target; dropping it"
                    );
                    if let Err(e) = self.store().update(|s| s.attempt = None) {
                        tracing::error!(error = %e, "cannot update state.json");
                        return;
                    }
                }
                Plan::Resume => break,
                Plan::Start(attempt) => {
                    if self.release_key().is_none()
                        && self.config.provisioning_key.is_some()
                        && !self.release_key_refreshed
                    {
                        // The next check-in fetches the fleet's release key first; starting now
                        // would only count a failure.
                        return;
                    }
                    if let Err(e) = runner::begin(&self.runner_context(shutdown), &attempt) {
                        tracing::error!(error = %e, "cannot record the new attempt");
                        self.defer_update();
                        return;
                    }
                    if attempt.offer.module == Module::App {
                        // The new release starts with the new config: no reload needed.
                        self.reload_due = false;
                    }
                    break;
                }
            }
        }
        let ctx = self.runner_context(shutdown);
        let cancel_download = ctx.cancel_download.clone();
        let handle = tokio::spawn(async move { runner::drive(&ctx).await });
        self.task = Some(Task {
            handle,
            cancel_download,
        });
    }

    /// Runs `[app] reload` in the committed app release if the config changed and no update is
    /// running (one that is running finishes first; its start command saw the old config).
    fn maybe_reload(&mut self, shutdown: &CancellationToken) {
        if !self.reload_due || self.task.is_some() || self.reload.is_some() {
            return;
        }
        self.reload_due = false;
        if self.config.app.reload.is_none() {
            return;
        }
        let layout = AppLayout::new(self.config.app_root());
        let current = self
            .store()
            .get()
            .current
            .clone()
            .filter(|c| c.module == Module::App)
            .map(|c| c.version)
            .filter(|v| layout.release_dir(v).is_dir());
        let Some(release) = current else {
            tracing::debug!("the config changed, but no app release is installed to reload");
            return;
        };
        let config = self
            .desired
            .as_ref()
            .map_or(&serde_json::Value::Null, |d| &d.config);
        let hooks = app::Hooks {
            config: self.config.app.clone(),
            apps_root: self.config.apps_root(),
            config_json: device_config::config_text(config),
            config_file: self.paths.config_json(),
            log: self.paths.work_dir().join(".reload.log"),
        };
        let dir = layout.release_dir(&release);
        self.reload = Some(tokio::spawn(device_config::reload(
            hooks,
            release,
            dir,
            shutdown.child_token(),
        )));
    }

    fn runner_context(&self, shutdown: &CancellationToken) -> runner::Context {
        let cancel = shutdown.child_token();
        // A child of the task's token: shutdown stops a download too, while cancelling only
        // this one (the target changed) leaves an install that has begun alone.
        let cancel_download = cancel.child_token();
        runner::Context {
            config: self.config.clone(),
            paths: self.paths.clone(),
            client: self.client.clone(),
            credential: self.enrolment.as_ref().map(|e| e.credential.clone()),
            release_key: self.release_key(),
            store: self.store.clone(),
            outbox: self.outbox.clone(),
            outbox_changed: self.outbox_changed.clone(),
            crash: self.crash.clone(),
            cancel,
            cancel_download,
        }
    }

    fn update_done(
        &mut self,
        result: Result<Result<RunEnd, UpdateError>, JoinError>,
        shutdown: &CancellationToken,
    ) {
        self.task = None;
        match result {
            Ok(Ok(RunEnd::Finished)) => {
                self.update_deferrals = 0;
                // Tell the hub soon: it is waiting to see the new current release.
                self.next_poll = Instant::now();
            }
            Ok(Ok(RunEnd::Deferred(why))) => {
                tracing::warn!(%why, "update paused; it continues later");
                self.defer_update();
            }
            Ok(Ok(RunEnd::Cancelled)) => {}
            Ok(Err(e)) => {
                tracing::error!(error = %e, "update stopped by a local error; it continues later");
                self.defer_update();
            }
            Err(e) => {
                tracing::error!(error = %e, "the update task crashed; it continues later");
                self.defer_update();
            }
        }
        if !shutdown.is_cancelled() {
            self.maybe_start_update(shutdown);
            self.maybe_reload(shutdown);
        }
    }

    /// Waits before resuming an update that could not go on (network trouble, a local error):
    /// exponential backoff, so that nothing retries in a loop. No failure is counted.
    fn defer_update(&mut self) {
        self.update_deferrals = self.update_deferrals.saturating_add(1);
        let wait = schedule::error_backoff(self.update_deferrals, &self.config.poll);
        self.update_retry_at = Some(Instant::now() + schedule::jittered(wait, HARD_MIN_INTERVAL));
    }

    async fn stop_task(&mut self) {
        if let Some(reload) = self.reload.take() {
            // Its token is a child of `shutdown`: the command's process group is being killed.
            let _ = reload.await;
        }
        if let Some(task) = self.task.take() {
            // The task's tokens are children of `shutdown`, so it is already stopping: a running
            // command's process group is killed, and the step stays in state.json for the next
            // start.
            if let Err(e) = task.handle.await {
                tracing::error!(error = %e, "the update task crashed while stopping");
            }
        }
    }

    /// Finishes what a crash may have cut short outside an attempt: the desired state is applied
    /// to the failure counts again (the crash may have come between writing `desired.json` and
    /// `state.json`; applying it twice changes nothing), and when no attempt is in progress the
    /// unpack area and downloads other than the target's are removed.
    fn settle_after_restart(&mut self) -> Result<(), FileError> {
        if let Some(desired) = &self.desired {
            self.store().update(|s| s.apply_desired(desired))?;
        }
        if self.store().get().attempt.is_some() {
            return Ok(());
        }
        let work = self.paths.work_dir();
        fsutil::remove_if_exists(&work)?;
        fsutil::create_dir_all(&work, 0o700)?;
        let target = self
            .desired
            .as_ref()
            .and_then(|d| d.release.as_ref())
            .map(|r| r.sha256.as_str());
        crate::download::remove_stale(&self.paths.downloads_dir(), target)
    }

    /// When no attempt is in progress, makes `state.json` and the `current` symlink agree. The
    /// symlink wins when it points at a complete release (it is what actually runs); a missing
    /// symlink is recreated from state.json when that release is still on disk.
    fn reconcile_app_link(&mut self) -> Result<(), FileError> {
        let state = self.store().get().clone();
        if state.attempt.is_some() {
            return Ok(());
        }
        let layout = AppLayout::new(self.config.app_root());
        let linked = app::current_release(&layout)?;
        let current_app = state
            .current
            .as_ref()
            .filter(|c| c.module == Module::App)
            .map(|c| c.version.clone());
        match (current_app, linked) {
            (Some(current), Some(linked)) if current != linked => {
                tracing::warn!(%current, %linked, "state.json and the current symlink disagree; trusting the symlink");
                self.set_current_app(linked)?;
            }
            (None, Some(linked)) if state.current.is_none() => {
                tracing::info!(%linked, "found an installed app release");
                self.set_current_app(linked)?;
            }
            (Some(current), None) if layout.release_dir(&current).is_dir() => {
                tracing::warn!(%current, "the current symlink is missing; recreating it");
                app::point_current(&layout, Some(&current))?;
            }
            _ => {}
        }
        Ok(())
    }

    fn set_current_app(&self, version: String) -> Result<(), FileError> {
        self.store().update(|s| {
            s.current = Some(Installed {
                version,
                module: Module::App,
            });
        })
    }
}
