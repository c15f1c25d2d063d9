//! [`IsolatedPlugin`] and its instances: the executor's seam implemented by a worker
//! process, with the supervision that restarts a worker that died.

use std::{
    collections::VecDeque,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use parking_lot::Mutex;
use plugin_api::{codes, Reply};

use super::{
    child::Limits,
    process::{CallError, Opened, Outcome, StartError, Worker},
    protocol::{ToWorker, WireError},
};
use crate::{
    instance::{
        CreateError, HostServices, InstanceSource, Lane, Laned, Message, ProcessEvent,
        ProcessStatus, ServiceInstance,
    },
    loader::{LoadError, Manifest, ShadowCopy},
};

/// How an isolated service is supervised: how often its worker may die before it stays
/// down, and how long a restart waits.
///
/// Defaults: at most 5 crashes within 60 s (the sixth leaves the service failed), the first
/// restart at once, the next ones after 100 ms, 200 ms, 400 ms... up to 10 s. OTP's
/// supervisors default to 1 restart in 5 s, for processes that restart in microseconds; a
/// worker restarts in milliseconds and restores a state, and a crash loop should cost the
/// host little (see README, "Isolated services").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Isolation {
    /// Crashes tolerated within `restart_window`; one more and no worker is started again.
    pub max_restarts: u32,
    /// The window `max_restarts` counts in.
    pub restart_window: Duration,
    /// The wait before the second restart within the window; it doubles each time.
    pub backoff: Duration,
    /// The longest wait before a restart.
    pub backoff_max: Duration,
    /// The worker's address-space limit in bytes (`RLIMIT_AS`), if any: an allocation past
    /// it fails (a Rust plugin then aborts, and its worker is restarted). It counts address
    /// space, not memory in use: thread stacks and allocator arenas count in full.
    pub memory_max: Option<u64>,
    /// Confine the worker with Landlock (where the kernel has it) to reading its plugin
    /// file and the system's libraries: nothing else of the file system, and no writes.
    pub landlock: bool,
}

impl Default for Isolation {
    fn default() -> Self {
        Isolation {
            max_restarts: 5,
            restart_window: Duration::from_secs(60),
            backoff: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            memory_max: None,
            landlock: false,
        }
    }
}

/// A plugin file prepared to run in worker processes: its private copy (kept while this
/// lives, for restarts), its manifest (read in a child process: the host never opens the
/// file), and
/// how its workers are run and supervised.
pub struct IsolatedPlugin {
    copy: ShadowCopy,
    manifest: Manifest,
    program: PathBuf,
    settings: Isolation,
    /// How long a worker may take to answer a call (the kernel's operation timeout): past
    /// it, the worker is killed. The kernel, which waits as long for an operation, may give
    /// it up a moment before; the executor then comes back as soon as the worker is dead.
    timeout: Duration,
    spin: Duration,
    /// Its worker now, as its instance last reported it.
    status: std::sync::Mutex<ProcessStatus>,
}

impl std::fmt::Debug for IsolatedPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IsolatedPlugin")
            .field("path", &self.copy.path())
            .field("service", &self.manifest.name)
            .field("version", &self.manifest.version.to_string())
            .finish_non_exhaustive()
    }
}

/// Reads the manifest of a copied plugin file in a worker process, which opens it and
/// exits: for a kernel with no probe (whose report says which service a file provides).
pub fn read_manifest(
    program: &Path,
    copy: &ShadowCopy,
    timeout: Duration,
) -> Result<Manifest, LoadError> {
    let deadline = Instant::now() + timeout;
    let (worker, opened, _) = Worker::start(program, copy, None, &Limits::default(), deadline)
        .map_err(|error| load_error(program, copy.path(), error))?;
    worker.exit(Instant::now() + timeout);
    manifest_of(copy.path(), opened)
}

fn manifest_of(path: &Path, opened: Opened) -> Result<Manifest, LoadError> {
    Manifest::from_parts(&opened.name, &opened.version, &opened.dependencies).map_err(|reason| {
        LoadError::InvalidManifest {
            path: path.to_owned(),
            reason,
        }
    })
}

fn load_error(program: &Path, path: &Path, error: StartError) -> LoadError {
    match error {
        StartError::Spawn(source) => LoadError::WorkerFailed {
            path: path.to_owned(),
            program: program.to_owned(),
            source,
        },
        StartError::NotStarted(how) => LoadError::WorkerDidNotStart {
            path: path.to_owned(),
            program: program.to_owned(),
            how,
        },
        StartError::Crashed(how) => LoadError::WorkerCrashed {
            path: path.to_owned(),
            how,
        },
        StartError::Killed(how) => LoadError::WorkerKilled {
            path: path.to_owned(),
            how,
        },
        StartError::Refused(reason) => LoadError::WorkerRefused {
            path: path.to_owned(),
            reason,
        },
    }
}

impl IsolatedPlugin {
    /// A copied plugin file whose manifest a worker read, to run in workers of `program`.
    pub fn new(
        copy: ShadowCopy,
        manifest: Manifest,
        program: PathBuf,
        settings: Isolation,
        timeout: Duration,
        spin: Duration,
    ) -> Self {
        IsolatedPlugin {
            copy,
            manifest,
            program,
            settings,
            timeout,
            spin,
            status: Default::default(),
        }
    }

    /// Its worker process now (the last instance's).
    pub fn status(&self) -> ProcessStatus {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The plugin file.
    pub fn path(&self) -> &Path {
        self.copy.path()
    }

    /// The SHA-256 of the file's content.
    pub fn sha256(&self) -> &[u8; 32] {
        self.copy.sha256()
    }

    /// The manifest a worker read.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// How its workers are supervised.
    pub fn settings(&self) -> &Isolation {
        &self.settings
    }

    /// How long a worker may take to answer a call before it is killed: the operation
    /// timeout less a tenth of it (at most 1 s), so that an operation queued behind a call
    /// that hangs (a stop, a checkpoint) is still done within its own operation timeout.
    pub fn call_timeout(&self) -> Duration {
        self.timeout - (self.timeout / 10).min(Duration::from_secs(1))
    }

    /// Starts a worker for the service and has it create its instance; with what confines
    /// it, if asked for.
    fn bring_up(
        &self,
        services: &Arc<dyn HostServices>,
        config: Option<&str>,
    ) -> Result<(Worker, Option<String>), CreateError> {
        let deadline = Instant::now() + self.call_timeout();
        let name = &self.manifest.name;
        let limits = Limits {
            memory_max: self.settings.memory_max,
            landlock: self.settings.landlock,
        };
        let started = Worker::start(&self.program, &self.copy, Some(name), &limits, deadline);
        let (mut worker, opened, confined) = match started {
            Ok(started) => started,
            Err(error) => {
                let hosts = matches!(
                    error,
                    StartError::Spawn(_) | StartError::NotStarted(_) | StartError::Killed(_)
                );
                let message =
                    plugin_api::error_chain(&load_error(&self.program, self.copy.path(), error));
                return Err(if hosts {
                    CreateError::Host(message)
                } else {
                    CreateError::Plugin(message)
                });
            }
        };
        if opened.name != *name || opened.version != self.manifest.version.to_string() {
            worker.kill();
            return Err(CreateError::Plugin(format!(
                "its worker opened {} {} where {name} {} was read before",
                opened.name, opened.version, self.manifest.version
            )));
        }
        worker.serve_side(name, services.clone());
        match worker.create(config, &**services, self.spin, deadline) {
            Ok(Ok(())) => Ok((worker, confined)),
            Ok(Err(error)) => {
                worker.exit(Instant::now() + self.timeout);
                Err(CreateError::Plugin(error))
            }
            Err(error) => {
                let how = format!(
                    "its worker process (pid {}) {} while creating the instance",
                    worker.pid(),
                    worker.end_of(&error)
                );
                Err(if worker.killed_from_outside() {
                    CreateError::Host(how)
                } else if matches!(error, WireError::TimedOut(_)) {
                    CreateError::TimedOut(how)
                } else {
                    CreateError::Plugin(how)
                })
            }
        }
    }
}

impl InstanceSource for IsolatedPlugin {
    fn create(
        self: Arc<Self>,
        services: Arc<dyn HostServices>,
        config: Option<&str>,
    ) -> Result<Box<dyn ServiceInstance>, CreateError> {
        let (worker, confined) = self.bring_up(&services, config)?;
        let instance = Supervised {
            status: ProcessStatus {
                pid: Some(worker.pid()),
                confined,
                ..ProcessStatus::default()
            },
            plugin: self,
            services,
            config: config.map(str::to_owned),
            worker: Some(worker),
            started: false,
            crashes: VecDeque::new(),
            next_attempt: None,
            timer_armed: false,
            lost_to_the_host: false,
            pending: None,
            restart_deferred: false,
            timed_out: false,
        };
        instance.report(ProcessEvent::Started);
        Ok(Box::new(WorkerInstance(Arc::new(Mutex::new(instance)))))
    }
}

/// One instance of an isolated service, shared by its executor and its [`Lane`] (whose
/// calls never overlap the executor's: see `executor::Mailbox::through_lane`; the lock is
/// never contended, it makes the sharing safe).
struct WorkerInstance(Arc<Mutex<Supervised>>);

/// An isolated instance's worker process, and what brings another up when that one dies.
struct Supervised {
    plugin: Arc<IsolatedPlugin>,
    services: Arc<dyn HostServices>,
    config: Option<String>,
    /// `None` between a crash and the restart.
    worker: Option<Worker>,
    /// Whether `start` succeeded: from then on a worker that dies is restarted, and the
    /// restarted one is started too.
    started: bool,
    /// When the recent crashes happened (within the restart window).
    crashes: VecDeque<Instant>,
    /// When the next restart is due (the backoff after the last crash).
    next_attempt: Option<Instant>,
    /// Whether a timer will nudge the executor when that is.
    timer_armed: bool,
    /// Whether the last worker lost was killed from outside (a SIGKILL the host did not
    /// send): not the plugin's doing.
    lost_to_the_host: bool,
    /// A request handled through the lane whose requester stopped waiting before the
    /// worker answered: the worker's own deadline for it. Its reply is waited for (and
    /// dropped) before the next call, killing the worker if none comes by then.
    pending: Option<Instant>,
    /// Whether the restart after the last crash was put behind what the mailbox held.
    restart_deferred: bool,
    /// Whether the last worker lost was killed for not answering in time.
    timed_out: bool,
    status: ProcessStatus,
}

/// A call's outcome, or how the worker was lost.
type Called = Result<Outcome, String>;

/// Who needs a worker brought back, and so whether the backoff is waited for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Revive {
    /// A request or an event: waits for the backoff, asleep.
    ForARequest,
    /// A lifecycle call of the kernel's (export, stop, import, start): does not wait.
    ForAnOperation,
    /// The executor between messages: restarts when due, or arms a timer for then.
    WhenDue,
}

impl Supervised {
    /// Publishes the worker's status after `event`: for `list` (through the plugin) and the
    /// metrics.
    fn report(&self, event: ProcessEvent) {
        *self.plugin.status.lock().unwrap_or_else(|p| p.into_inner()) = self.status.clone();
        self.services.process_status(&self.status, event);
    }

    /// Sends a call to the worker (restarting it first if it died and the instance had
    /// started); a worker lost during the call is described in the error. A worker found
    /// gone before the call reached it (it died while idle) is restarted, and the call sent
    /// to the new one: only a call in flight is lost.
    /// Every call may take the operation timeout.
    fn call(&mut self, what: &'static str, message: &ToWorker<'_>) -> Called {
        let timeout = self.plugin.call_timeout();
        let how = match message {
            ToWorker::Handle { .. } | ToWorker::Event { .. } => Revive::ForARequest,
            _ => Revive::ForAnOperation,
        };
        let mut tries = 0;
        loop {
            tries += 1;
            self.settle();
            self.revive(how)?;
            // Brought back by `revive` (which, for a request or an operation, returns only
            // once a worker runs, or with why none does).
            let Some(worker) = self.worker.as_mut() else {
                return Err(format!(
                    "service `{}` has no worker process",
                    self.plugin.manifest.name
                ));
            };
            let deadline = Instant::now() + timeout;
            match worker.call(message, &*self.services, self.plugin.spin, deadline) {
                Ok(outcome) => return Ok(outcome),
                Err(CallError { delivered, error }) => {
                    let lost = self.failed(what, delivered, &error);
                    if delivered || tries > 1 || !self.started {
                        return Err(lost);
                    }
                }
            }
        }
    }

    /// Records the worker lost to `error` in a call of `what` (`delivered`: in flight),
    /// killing it if it still runs; says how, and what happens next.
    fn failed(&mut self, what: &str, delivered: bool, error: &WireError) -> String {
        let when = if delivered { "during" } else { "before" };
        let timeout = self.plugin.call_timeout();
        let Some(worker) = self.worker.as_mut() else {
            return format!("its worker process was gone {when} {what}");
        };
        let pid = worker.pid();
        let ended = worker.end_of(error);
        self.lost_to_the_host = worker.killed_from_outside();
        self.timed_out = matches!(error, WireError::TimedOut(_));
        let how = match error {
            WireError::TimedOut(_) => format!(
                "its worker process (pid {pid}) did not answer {what} within {timeout:?}, and was killed"
            ),
            _ => format!("its worker process (pid {pid}) {ended} {when} {what}"),
        };
        self.lost(how)
    }

    /// Waits for the reply to a request whose requester, through the lane, stopped
    /// waiting (see [`Supervised::pending`]), and drops it, answering its callbacks; a
    /// worker that does not answer by its deadline is killed, a crash like any other.
    fn settle(&mut self) {
        let Some(deadline) = self.pending.take() else {
            return;
        };
        let Some(worker) = self.worker.as_mut() else {
            return;
        };
        if let Err(error) = worker.outcome(&*self.services, self.plugin.spin, deadline) {
            self.failed("handle", true, &error);
        }
    }

    /// A request through the lane (see [`Lane::handle`]): refused unless a worker runs
    /// the started instance with nothing left over, and never restarts one (a worker is
    /// started only by its executor's thread, whose end is the worker's: see
    /// `PR_SET_PDEATHSIG` in `child.rs`). A worker lost on the way is recorded as a crash
    /// and the executor nudged to bring the next up.
    fn through_lane(&mut self, request: Message<'_>, deadline: Instant) -> Laned {
        if !self.started || self.pending.is_some() || self.status.gave_up {
            return Laned::Refused;
        }
        let Some(worker) = self.worker.as_mut().filter(|worker| !worker.gone()) else {
            return Laned::Refused;
        };
        let message = ToWorker::Handle {
            from: request.from,
            kind: request.kind,
            payload: request.payload,
        };
        // The worker's deadline, as the executor's call would have it; the requester's
        // own may come first.
        let due = Instant::now() + self.plugin.call_timeout();
        if let Err(error) = worker.send(&message, due) {
            // Not delivered: the executor restarts the worker and delivers it.
            self.failed("handle", false, &error);
            self.services.nudge();
            return Laned::Refused;
        }
        match worker.outcome(&*self.services, self.plugin.spin, deadline.min(due)) {
            Ok(Outcome::Replied(reply)) => Laned::Replied(reply),
            Ok(other) => Laned::Replied(Reply::error(
                codes::FAILED,
                format!("the worker answered another call: {other:?}"),
            )),
            Err(WireError::TimedOut(_)) if deadline < due => {
                self.pending = Some(due);
                self.services.nudge();
                Laned::TimedOut
            }
            Err(error) => {
                let how = self.failed("handle", true, &error);
                self.services.nudge();
                Laned::Replied(Reply::error(codes::UNAVAILABLE, how))
            }
        }
    }

    /// Records a worker lost: the crash, and what happens next.
    fn lost(&mut self, how: String) -> String {
        self.worker = None;
        let now = Instant::now();
        self.crashes.push_back(now);
        let window = self.plugin.settings.restart_window;
        while self
            .crashes
            .front()
            .is_some_and(|at| now.duration_since(*at) > window)
        {
            self.crashes.pop_front();
        }
        let settings = &self.plugin.settings;
        let gave_up = self.started && self.crashes.len() > settings.max_restarts as usize;
        self.next_attempt = Some(now + self.backoff());
        self.status.pid = None;
        self.status.crashes += 1;
        self.status.last_crash = Some(how.clone());
        self.status.gave_up |= gave_up;
        self.report(ProcessEvent::Crashed);
        let service = &self.plugin.manifest.name;
        if !self.started {
            tracing::error!(service, crash = %how, "the worker died before the service started");
            how
        } else if gave_up {
            tracing::error!(service, crash = %how, crashes = self.crashes.len(), window = ?window, "the worker died too often: not restarted (`ctl start` or a new version brings the service back)");
            format!(
                "{how}; {} crash{} within {window:?}: not restarted",
                self.crashes.len(),
                if self.crashes.len() == 1 { "" } else { "es" }
            )
        } else {
            tracing::error!(service, crash = %how, "the worker died; restarting it from the last checkpoint");
            format!("{how}; restarting from the last checkpoint")
        }
    }

    /// Brings up a new worker if the last one died after the instance started: from the
    /// service's last durable state, after the backoff. Gives up (the error says why) once
    /// the crashes within the window pass the limit.
    fn revive(&mut self, how: Revive) -> Result<(), String> {
        while self.worker.is_none() {
            let service = self.plugin.manifest.name.clone();
            if !self.started {
                return Err(format!(
                    "service `{service}` lost its worker process before it started"
                ));
            }
            if self.status.gave_up {
                return Err(format!(
                    "service `{service}` is failed: its worker process died {} times within {:?} ({})",
                    self.crashes.len(),
                    self.plugin.settings.restart_window,
                    self.status.last_crash.as_deref().unwrap_or("")
                ));
            }
            let due = self.next_attempt.take();
            match (how, due) {
                // Waited for asleep by a request (it waits for the restart, within its
                // timeout; the backoff is bounded below the operation timeout).
                (Revive::ForARequest, Some(due)) => {
                    std::thread::sleep(due.saturating_duration_since(Instant::now()))
                }
                // An operation (a checkpoint, a stop, a replace) does not wait for it.
                (Revive::ForAnOperation, _) | (_, None) => {}
                // Between messages: a timer nudges the executor when it is due, so that
                // nothing queued waits behind the sleep.
                (Revive::WhenDue, Some(due)) if due > Instant::now() => {
                    self.next_attempt = Some(due);
                    if !self.timer_armed {
                        self.timer_armed = true;
                        let services = self.services.clone();
                        let wait = due.saturating_duration_since(Instant::now());
                        let armed = crate::loader::threads::spawn_detached(
                            &format!("restart-{service}"),
                            move || {
                                std::thread::sleep(wait);
                                services.nudge();
                            },
                        );
                        if armed.is_err() {
                            // No timer: the next message restarts it.
                            self.timer_armed = false;
                        }
                    }
                    return Ok(());
                }
                (Revive::WhenDue, Some(_)) => {}
            }
            self.timer_armed = false;
            match self.restart() {
                Ok(worker) => {
                    self.restart_deferred = false;
                    self.status.pid = Some(worker.pid());
                    self.status.restarts += 1;
                    self.worker = Some(worker);
                    self.report(ProcessEvent::Restarted);
                    tracing::info!(
                        service,
                        pid = self.status.pid,
                        restarts = self.status.restarts,
                        "worker restarted"
                    );
                }
                Err(how_lost) => {
                    // The next try waits for its backoff as this one did (between messages:
                    // a timer again).
                    self.lost(how_lost);
                }
            }
        }
        Ok(())
    }

    /// The wait before the next restart: none for the first crash within the window, then
    /// the backoff, doubled for each crash more.
    fn backoff(&self) -> Duration {
        let settings = &self.plugin.settings;
        match self.crashes.len() {
            0 | 1 => Duration::ZERO,
            n => {
                let doubled = settings
                    .backoff
                    .saturating_mul(1u32 << (n - 2).min(20) as u32);
                doubled.min(settings.backoff_max)
            }
        }
    }

    /// A new worker, created, with the last durable state imported, started.
    fn restart(&mut self) -> Result<Worker, String> {
        let (mut worker, confined) = self
            .plugin
            .bring_up(&self.services, self.config.as_deref())
            .map_err(|error| error.to_string())?;
        self.status.confined = confined;
        let saved = self
            .services
            .saved_state()
            .map_err(|error| format!("its last state could not be read: {error}"));
        let deadline = || Instant::now() + self.plugin.call_timeout();
        let spin = self.plugin.spin;
        let mut step = |what: &str, message: &ToWorker<'_>| -> Result<(), String> {
            match worker.call(message, &*self.services, spin, deadline()) {
                Ok(Outcome::Done(Ok(()))) => Ok(()),
                Ok(Outcome::Done(Err(error))) => Err(format!("{what} failed: {error}")),
                Ok(_) => Err(format!("{what}: the worker answered another call")),
                Err(CallError { error, .. }) => Err(format!(
                    "its worker process (pid {}) {} during {what}",
                    worker.pid(),
                    worker.end_of(&error)
                )),
            }
        };
        if let Some((version, state)) = saved? {
            step(
                "import_state",
                &ToWorker::Import {
                    from_version: &version,
                    state: &state,
                },
            )?;
        }
        step("start", &ToWorker::Start)?;
        Ok(worker)
    }

    /// The state of an instance whose worker died, without starting another: the last
    /// durable state, which a new worker would import, when this version exported it (a
    /// state of another version is not this version's to hand over as its own).
    fn saved_if_dead(&self) -> Option<Vec<u8>> {
        if self.worker.is_some() || !self.started {
            return None;
        }
        let (version, bytes) = self.services.saved_state().ok()??;
        (version == self.plugin.manifest.version.to_string()).then_some(bytes)
    }

    fn unit(called: Called) -> Result<(), String> {
        match called? {
            Outcome::Done(done) => done,
            other => Err(format!("the worker answered another call: {other:?}")),
        }
    }
}

impl Supervised {
    fn start(&mut self) -> Result<(), String> {
        let started = Self::unit(self.call("start", &ToWorker::Start));
        self.started = started.is_ok();
        started
    }

    fn stop(&mut self) -> Result<(), String> {
        if self.worker.is_none() {
            // Its worker died (or crashed too often): nothing runs to be stopped, and none
            // is started only to be stopped.
            self.started = false;
            return Ok(());
        }
        let stopped = Self::unit(self.call("stop", &ToWorker::Stop));
        self.started = false;
        stopped
    }

    fn handle(&mut self, request: Message<'_>) -> Reply {
        let message = ToWorker::Handle {
            from: request.from,
            kind: request.kind,
            payload: request.payload,
        };
        match self.call("handle", &message) {
            Ok(Outcome::Replied(reply)) => reply,
            Ok(other) => Reply::error(
                codes::FAILED,
                format!("the worker answered another call: {other:?}"),
            ),
            Err(how) => Reply::error(codes::UNAVAILABLE, how),
        }
    }

    fn on_event(&mut self, event: Message<'_>) -> Result<(), String> {
        let message = ToWorker::Event {
            from: event.from,
            kind: event.kind,
            payload: event.payload,
        };
        Self::unit(self.call("on_event", &message))
    }

    fn export_state(&mut self) -> Result<Vec<u8>, String> {
        if let Some(saved) = self.saved_if_dead() {
            return Ok(saved);
        }
        match self.call("export_state", &ToWorker::Export)? {
            Outcome::Exported(exported) => exported,
            other => Err(format!("the worker answered another call: {other:?}")),
        }
    }

    fn import_state(&mut self, from_version: &str, state: &[u8]) -> Result<(), String> {
        let message = ToWorker::Import {
            from_version,
            state,
        };
        Self::unit(self.call("import_state", &message))
    }

    fn answered(&mut self) {
        // A request the lane gave up on is waited out first (a nudge brought the executor
        // here for it).
        self.settle();
        // Its side socket closed: the worker died while idle (the side thread nudged the
        // executor to get here).
        if let Some(worker) = self.worker.as_mut().filter(|worker| worker.gone()) {
            let how = format!(
                "its worker process (pid {}) {} while idle",
                worker.pid(),
                worker.end_of(&WireError::Closed)
            );
            self.lost(how);
        }
        if self.worker.is_none() && self.started && !self.status.gave_up {
            if !self.restart_deferred {
                // What was queued behind the lost call goes first (a stop or a checkpoint
                // needs no new worker: see `saved_if_dead`); a nudge behind it brings the
                // restart.
                self.restart_deferred = true;
                self.services.nudge();
                return;
            }
            // Brought back now (or when its backoff is due), not at the next message: the
            // mailbox holds what comes meanwhile, and the restart's own errors are recorded
            // as crashes.
            let _ = self.revive(Revive::WhenDue);
        }
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        if let Some(worker) = self.worker.take() {
            worker.exit(Instant::now() + self.plugin.timeout);
            // Gone: `list` shows no process for a stopped service.
            self.status.pid = None;
            *self.plugin.status.lock().unwrap_or_else(|p| p.into_inner()) = self.status.clone();
        }
    }
}

impl ServiceInstance for WorkerInstance {
    fn start(&mut self) -> Result<(), String> {
        self.0.lock().start()
    }

    fn stop(&mut self) -> Result<(), String> {
        self.0.lock().stop()
    }

    fn handle(&mut self, request: Message<'_>) -> Reply {
        self.0.lock().handle(request)
    }

    fn on_event(&mut self, event: Message<'_>) -> Result<(), String> {
        self.0.lock().on_event(event)
    }

    fn export_state(&mut self) -> Result<Vec<u8>, String> {
        self.0.lock().export_state()
    }

    fn import_state(&mut self, from_version: &str, state: &[u8]) -> Result<(), String> {
        self.0.lock().import_state(from_version, state)
    }

    fn lost_to_the_host(&self) -> bool {
        self.0.lock().lost_to_the_host
    }

    fn timed_out(&self) -> bool {
        self.0.lock().timed_out
    }

    fn answered(&mut self) {
        self.0.lock().answered()
    }

    fn lane(&self) -> Option<Arc<dyn Lane>> {
        Some(self.0.clone())
    }
}

impl Lane for Mutex<Supervised> {
    fn handle(&self, request: Message<'_>, deadline: Instant) -> Laned {
        match self.try_lock() {
            Some(mut supervised) => supervised.through_lane(request, deadline),
            None => Laned::Refused,
        }
    }
}
