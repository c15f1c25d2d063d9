//! The kernel: the registry of services, their lifecycles, and the routing of requests and
//! events between them.
//!
//! Each registered service has a `ServiceSlot`: its current library, its mailbox (which
//! outlives versions), its run state ([`Run`]: idle, running with its executor, or stuck
//! with its thread), and what `list` shows, derived from the run state. Operations that
//! change a service (start, stop, checkpoint, replace) hold the slot's operation lock, so
//! they never interleave, and take it with a deadline; requests never take that lock: they
//! read the status and post to the mailbox.
//!
//! A library the service no longer uses is *retired*: it is closed once no plugin code can
//! run any more (its executors have ended, and no thread it may have started is alive); until
//! then it stays loaded, and `list` shows it as pinned.

mod deps;
mod lifecycle;
mod loaded;
mod retired;
mod routing;
mod swap;

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{atomic::AtomicBool, Arc, Mutex, RwLock},
    time::{Duration, Instant, SystemTime},
};

use plugin_api::Reply;
use sha2::{Digest, Sha256};

pub use deps::DependencyError;
pub use loaded::Loaded;
pub use routing::PendingReply;
pub use swap::{SwapError, SwapReport};

use crate::{
    executor::{Executor, Mailbox, Stuck},
    instance::ProcessStatus,
    loader::{LoadError, Loader, Probe},
    state::{StateBackend, StateError, StateStore},
    worker::Isolation,
};

/// The life of a service.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Status {
    /// Loaded, never started.
    #[default]
    Registered,
    /// Its instance is being created, its state imported, `start` called.
    Starting,
    /// Serving requests.
    Running,
    /// Being stopped.
    Stopping,
    /// Stopped; its library stays loaded so that it can be started again.
    Stopped,
    /// Could not start, or its instance was lost; see the last error.
    Failed,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Status::Registered => "registered",
            Status::Starting => "starting",
            Status::Running => "running",
            Status::Stopping => "stopping",
            Status::Stopped => "stopped",
            Status::Failed => "failed",
        })
    }
}

/// What to do with a state file that cannot be opened or imported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BadStatePolicy {
    /// Leave the file untouched and do not start the service.
    #[default]
    Refuse,
    /// Move the file aside to `<service>.state.bad-<timestamp>` and start the service fresh.
    Quarantine,
}

/// How a kernel is set up.
#[derive(Debug)]
pub struct KernelConfig {
    /// Capacity of each service's mailbox (at least 1).
    pub mailbox_capacity: usize,
    /// Timeout of requests that do not name one (external requests).
    pub request_timeout: Duration,
    /// How long the kernel waits for an instance to start (create, import, start), or for a
    /// service to reach a checkpoint, a hot replace or a stop (it first finishes the requests
    /// queued before). A service stuck longer is reported, and left as it is.
    pub operation_timeout: Duration,
    /// Where the shadow copies of plugin files go (the temporary directory if `None`).
    pub shadow_dir: Option<PathBuf>,
    /// Where state is persisted; `None` runs without persistence.
    pub state: Option<StateStore>,
    /// What to do with a state file that cannot be used.
    pub on_bad_state: BadStatePolicy,
    /// Prove every plugin file in a child process before opening it (see [`Probe`]);
    /// `None` opens files directly. The daemon always probes.
    pub probe: Option<Probe>,
    /// How long a thread that expects a message soon (an executor after serving one, a
    /// requester waiting for its reply) polls for it before it sleeps; zero sleeps at once.
    /// Waking a sleeping thread is what an exchange costs most on a virtual machine.
    pub spin: Duration,
    /// The services whose instances run in worker processes, and how those are supervised
    /// (see [`crate::worker`]); the others run in this process. Changed by
    /// [`Kernel::set_isolation`].
    pub isolation: BTreeMap<String, Isolation>,
    /// The program run as a worker (`PROGRAM worker FILE ...`): the `microkernel` binary.
    /// The probe's program when `None`; needed when a service is isolated.
    pub worker_program: Option<PathBuf>,
    /// Where service states are kept instead of `state`'s directory (a store a fleet of
    /// hosts shares); `state` then keeps only the host's own records.
    pub state_backend: Option<Arc<dyn StateBackend>>,
    /// Which services this host may run, when it is one of a fleet (see [`Placement`]);
    /// `None`: every service.
    pub placement: Option<Arc<dyn Placement>>,
}

/// Which services this host runs, when it shares them with others: a service it does not
/// own is loaded but not started, requests for it are answered `421` naming its owner,
/// and `start` refuses it.
pub trait Placement: Send + Sync + std::fmt::Debug {
    /// Whether this host owns `service` now.
    fn owns(&self, service: &str) -> bool;
    /// The host that owns `service`, as last known.
    fn owner_of(&self, service: &str) -> Option<String>;
    /// What the metrics show of the fleet.
    fn stats(&self) -> crate::metrics::FleetStats {
        crate::metrics::FleetStats::default()
    }
}

impl Default for KernelConfig {
    fn default() -> Self {
        KernelConfig {
            mailbox_capacity: 1024,
            request_timeout: Duration::from_secs(5),
            operation_timeout: Duration::from_secs(30),
            shadow_dir: None,
            state: None,
            on_bad_state: BadStatePolicy::Refuse,
            probe: None,
            spin: DEFAULT_SPIN,
            isolation: BTreeMap::new(),
            worker_program: None,
            state_backend: None,
            placement: None,
        }
    }
}

/// [`KernelConfig::spin`] by default: longer than a thread takes to wake on the virtual
/// machines measured (30 to 70 µs), short enough that an idle service costs nothing.
pub const DEFAULT_SPIN: Duration = Duration::from_micros(100);

/// Why a kernel operation failed. Every variant names the service or file.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// A plugin file could not be loaded.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// Two plugin files provide the same service.
    #[error("service `{service}` is provided by both {first} and {second}")]
    DuplicateService {
        /// The service.
        service: String,
        /// The file already registered.
        first: PathBuf,
        /// The other file.
        second: PathBuf,
    },
    /// No service of that name is registered.
    #[error("no service `{0}`")]
    UnknownService(String),
    /// Dependency order forbids starting the service.
    #[error(transparent)]
    Dependency(#[from] DependencyError),
    /// A dependency of the service is registered but not running.
    #[error("service `{service}` depends on `{dependency}`, which is not running")]
    DependencyNotRunning {
        /// The dependent service.
        service: String,
        /// The dependency.
        dependency: String,
    },
    /// The service's instance did not come up.
    #[error("service `{service}` failed to start: {cause}{}", state_file.as_ref().map(|p| format!(" (state file {})", p.display())).unwrap_or_default())]
    StartFailed {
        /// The service.
        service: String,
        /// Why.
        cause: crate::executor::InstanceError,
        /// The state file it was given, when `import_state` refused it.
        state_file: Option<PathBuf>,
    },
    /// The service's state could not be read or written.
    #[error("service `{service}`")]
    State {
        /// The service.
        service: String,
        /// What went wrong with its file.
        #[source]
        source: StateError,
    },
    /// The service's instance refused or failed an operation.
    #[error("service `{service}`: {cause}")]
    Instance {
        /// The service.
        service: String,
        /// Why.
        cause: String,
    },
    /// A hot replace did not happen (the old version keeps serving) or had to roll back.
    #[error(transparent)]
    Swap(#[from] SwapError),
    /// Another operation on the service (a checkpoint, a replace, a stop) did not finish in
    /// time; nothing was done.
    #[error("service `{service}` is busy with another operation; gave up after {waited:?}")]
    Busy {
        /// The service.
        service: String,
        /// How long this operation waited for it.
        waited: Duration,
    },
    /// This host does not own the service: another host of the fleet runs it.
    #[error("service `{service}` runs on {} in the fleet, not on this host", owner.as_deref().map(|o| format!("node `{o}`")).unwrap_or_else(|| "no host yet".into()))]
    NotOwner {
        /// The service.
        service: String,
        /// The node that owns it, if any.
        owner: Option<String>,
    },
    /// The service's instance is stuck in plugin code; its thread and library are left as
    /// they are.
    #[error("service `{service}` is {stuck}")]
    Stuck {
        /// The service.
        service: String,
        /// The plugin function its thread was in when it was given up.
        call: crate::executor::Call,
        /// Where it is stuck, in words (the call, the thread, what was waited for).
        stuck: String,
    },
}

/// What the kernel knows of a service.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceInfo {
    /// Service name.
    pub name: String,
    /// Version of the loaded library.
    pub version: String,
    /// Lifecycle status.
    pub status: Status,
    /// Services it depends on.
    pub dependencies: Vec<String>,
    /// The plugin file.
    pub path: PathBuf,
    /// SHA-256 of the plugin file, hex.
    pub sha256: String,
    /// When the current library was loaded (seconds since the Unix epoch).
    pub loaded_since: u64,
    /// How many hot replaces it went through.
    pub swaps: u64,
    /// The last error, if any.
    pub last_error: Option<String>,
    /// Earlier libraries of the service that stay loaded because plugin code may still run
    /// in them (a thread the plugin started, an instance stuck in plugin code), one line
    /// each.
    pub pinned: Vec<String>,
    /// Its worker process, when the service is isolated (`None`: it runs in the host).
    pub process: Option<ProcessStatus>,
    /// The node that owns it, when this host is one of a fleet.
    pub owner: Option<String>,
}

/// Counters, for operators and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct KernelStats {
    /// Libraries opened since the kernel started.
    pub libraries_opened: u64,
    /// State files written since the kernel started.
    pub state_writes: u64,
}

/// What stopping every service did.
#[derive(Debug, Default)]
pub struct StopReport {
    /// The services asked to stop, dependents before their dependencies.
    pub stopped: Vec<String>,
    /// Those whose `stop` failed, whose state could not be saved, or that did not stop in
    /// time (then [`KernelError::Stuck`] or [`KernelError::Busy`]: abandoned, their state
    /// not saved).
    pub failures: Vec<(String, KernelError)>,
}

impl StopReport {
    /// The services that did not stop in time: stuck in plugin code or busy.
    pub fn abandoned(&self) -> Vec<&str> {
        self.failures
            .iter()
            .filter(|(_, e)| matches!(e, KernelError::Stuck { .. } | KernelError::Busy { .. }))
            .map(|(s, _)| s.as_str())
            .collect()
    }
}

/// What a checkpoint did for one service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checkpoint {
    /// The state changed and was written.
    Written,
    /// The state was the one last written: nothing was written.
    Unchanged,
}

/// The kernel. Dropping it stops every service (saving their state) and closes every library.
#[derive(Debug)]
pub struct Kernel {
    inner: Arc<KernelInner>,
}

#[derive(Debug)]
pub(crate) struct KernelInner {
    me: std::sync::Weak<KernelInner>,
    pub(crate) loader: Loader,
    pub(crate) config: KernelConfig,
    /// The services that run isolated now (the configuration's, until changed).
    isolation: RwLock<BTreeMap<String, Isolation>>,
    services: RwLock<BTreeMap<String, Arc<ServiceSlot>>>,
    /// Libraries no service uses any more that could not be closed yet.
    retired: Mutex<Vec<retired::Retired>>,
    /// Every service ever registered (also after shutdown): the names its threads go by.
    ever_registered: Mutex<std::collections::BTreeSet<String>>,
    started_at: SystemTime,
    state_writes: std::sync::atomic::AtomicU64,
    pub(crate) metrics: crate::metrics::Metrics,
}

/// A registered service. Lives from registration until the kernel shuts down.
pub(crate) struct ServiceSlot {
    name: String,
    mailbox: Mailbox,
    /// Held by every operation that changes the service; taken with a deadline.
    ops: parking_lot::Mutex<SlotOps>,
    /// What requests and `list` read; never held across a call into a plugin. Its status is
    /// derived from the run state by [`ServiceSlot::publish`].
    info: RwLock<ServiceInfo>,
    /// Whether a background checkpoint of the service is under way.
    checkpointing: AtomicBool,
    /// The current version, when it is isolated: `list` reads its worker's status there.
    isolated: RwLock<Option<Arc<crate::worker::IsolatedPlugin>>>,
}

impl std::fmt::Debug for ServiceSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceSlot")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// Whether a service has an instance, and in what state: the one truth the status shown by
/// `list` is derived from.
#[derive(Debug)]
pub(crate) enum Run {
    /// No instance: never started, stopped on purpose, or lost.
    Idle(Idle),
    /// An instance serves the mailbox on this executor.
    Running(Executor),
    /// An instance did not stop (or start) in time: its thread is in plugin code and keeps
    /// its library loaded. The service is failed until the thread ends.
    Stuck(Stuck),
}

/// Why a service has no instance: the only statuses an idle service can have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Idle {
    /// Never started.
    Registered,
    /// Stopped on purpose.
    Stopped,
    /// Could not start, or its instance was lost.
    Failed,
}

impl From<Idle> for Status {
    fn from(idle: Idle) -> Status {
        match idle {
            Idle::Registered => Status::Registered,
            Idle::Stopped => Status::Stopped,
            Idle::Failed => Status::Failed,
        }
    }
}

impl Run {
    /// The status this run state shows, while no operation is under way.
    fn status(&self) -> Status {
        match self {
            Run::Idle(idle) => (*idle).into(),
            Run::Running(_) => Status::Running,
            Run::Stuck(_) => Status::Failed,
        }
    }

    /// Takes the executor out, leaving `Idle(then)`; `None` (and unchanged) when not running.
    fn take_executor(&mut self, then: Idle) -> Option<Executor> {
        match std::mem::replace(self, Run::Idle(then)) {
            Run::Running(executor) => Some(executor),
            other => {
                *self = other;
                None
            }
        }
    }

    /// Like [`Run::reap`], but the state a stuck thread hands over is returned as soon as
    /// it has (the thread may still be stopping its instance), and one that has come out of
    /// the call it was given up in is waited for, at most until `deadline` and once at most
    /// (see [`crate::executor::Stuck::handed_over_until`]): its state is newer than the file.
    fn reap_until(&mut self, deadline: Instant) -> Option<Vec<u8>> {
        let Run::Stuck(stuck) = self else {
            return None;
        };
        let late = stuck.handed_over_until(deadline);
        if stuck.ended() {
            *self = Run::Idle(Idle::Failed);
        }
        late
    }

    /// A stuck thread that has ended since is forgotten (the service is then failed);
    /// returns the state it handed over when it came out of plugin code, if any.
    fn reap(&mut self) -> Option<Vec<u8>> {
        if let Run::Stuck(stuck) = self {
            if stuck.ended() {
                let late = stuck.late_state();
                *self = Run::Idle(Idle::Failed);
                return late;
            }
        }
        None
    }
}

struct SlotOps {
    loaded: Loaded,
    run: Run,
    config: Option<String>,
    /// (version, SHA-256) of the state last written or read, to skip unchanged checkpoints.
    last_saved: Option<(String, [u8; 32])>,
}

type OpsGuard<'a> = parking_lot::MutexGuard<'a, SlotOps>;

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

impl ServiceSlot {
    fn read_info(&self) -> std::sync::RwLockReadGuard<'_, ServiceInfo> {
        self.info.read().unwrap_or_else(|p| p.into_inner())
    }

    fn info(&self) -> ServiceInfo {
        self.read_info().clone()
    }

    fn status(&self) -> Status {
        self.read_info().status
    }

    fn update(&self, f: impl FnOnce(&mut ServiceInfo)) {
        f(&mut self.info.write().unwrap_or_else(|p| p.into_inner()));
    }

    /// Takes what `list` shows of a version just loaded for the service.
    fn describe(&self, loaded: &Loaded) {
        self.update(|info| info.describe(loaded));
        *self.isolated.write().unwrap_or_else(|p| p.into_inner()) = match loaded {
            Loaded::Isolated(plugin) => Some(plugin.clone()),
            Loaded::InProcess(_) => None,
        };
    }

    /// Whether the service is isolated and its worker crashed too often: it runs nothing,
    /// and has nothing to checkpoint or export (its state is its last checkpoint).
    fn gave_up(&self) -> bool {
        self.process().is_some_and(|process| process.gave_up)
    }

    /// The worker process of an isolated service.
    fn process(&self) -> Option<ProcessStatus> {
        let isolated = self.isolated.read().unwrap_or_else(|p| p.into_inner());
        isolated.as_ref().map(|plugin| plugin.status())
    }

    /// Takes the operations lock, waiting at most until `deadline`.
    fn lock_ops(&self, deadline: Instant) -> Result<OpsGuard<'_>, KernelError> {
        let asked = Instant::now();
        self.ops
            .try_lock_until(deadline)
            .ok_or_else(|| KernelError::Busy {
                service: self.name.clone(),
                waited: asked.elapsed(),
            })
    }

    /// Shows the status derived from the run state; `during` is the operation under way
    /// (`Starting`, `Stopping`), if any.
    fn publish(&self, ops: &SlotOps, during: Option<Status>) {
        let status = during.unwrap_or_else(|| ops.run.status());
        self.update(|info| {
            info.status = status;
            if let Run::Stuck(stuck) = &ops.run {
                info.last_error = Some(if ops.loaded.is_isolated() {
                    format!("{stuck}; its thread is left as it is (its worker is killed at the call's deadline, and the thread then ends)")
                } else {
                    format!("{stuck}; its thread and library are left as they are")
                });
            }
        });
    }

    /// Records `error` as the last error.
    fn record_error(&self, error: &(dyn std::error::Error + 'static)) {
        let text = plugin_api::error_chain(error);
        self.update(|info| info.last_error = Some(text));
    }
}

impl ServiceInfo {
    /// Takes what `list` shows of a version that was just loaded for the service.
    fn describe(&mut self, loaded: &Loaded) {
        let manifest = loaded.manifest();
        self.version = manifest.version.to_string();
        self.dependencies = manifest.dependencies.clone();
        self.path = loaded.path().to_owned();
        self.sha256 = hex::encode(loaded.sha256());
        self.loaded_since = unix_now();
    }
}

impl Kernel {
    /// A kernel with no services.
    pub fn new(mut config: KernelConfig) -> std::io::Result<Self> {
        let loader = Loader::new(config.shadow_dir.as_deref(), config.probe.clone())?
            .with_close_timeout(config.operation_timeout);
        if config.worker_program.is_none() {
            config.worker_program = config.probe.as_ref().map(|p| p.program.clone());
        }
        if !config.isolation.is_empty() && config.worker_program.is_none() {
            return Err(no_worker_program());
        }
        let isolation = RwLock::new(config.isolation.clone());
        let kernel = Kernel {
            inner: Arc::new_cyclic(|me| KernelInner {
                me: me.clone(),
                loader,
                isolation,
                config,
                services: RwLock::new(BTreeMap::new()),
                retired: Mutex::new(Vec::new()),
                ever_registered: Mutex::new(Default::default()),
                started_at: SystemTime::now(),
                state_writes: Default::default(),
                metrics: crate::metrics::Metrics::new(),
            }),
        };
        // A probe has the state a service would import imported: a running service is
        // checkpointed first (its live state), then the saved state is read.
        let me = Arc::downgrade(&kernel.inner);
        kernel
            .inner
            .loader
            .set_state_source(Box::new(move |service| {
                let kernel = me.upgrade()?;
                let store = kernel.states()?;
                if let Some(slot) = kernel.slot(service) {
                    if slot.status() == Status::Running {
                        let checkpoint = kernel.checkpoint(&slot);
                        lifecycle::log_checkpoint(service, &checkpoint);
                    }
                }
                let saved = store.load(service).ok()??;
                Some((saved.version, saved.bytes))
            }));
        Ok(kernel)
    }

    /// The loader, to load plugin files for [`Kernel::register`] and [`Kernel::replace`].
    pub fn loader(&self) -> &Loader {
        &self.inner.loader
    }

    /// Loads a plugin file in the mode its service is configured for (see
    /// [`Kernel::set_isolation`]): in this process, or prepared for worker processes.
    ///
    /// # Safety
    ///
    /// As for [`Loader::load`]: the caller vouches for the file.
    pub unsafe fn load_version(
        &self,
        file: &crate::loader::PluginFile,
    ) -> Result<Loaded, LoadError> {
        // SAFETY: the caller vouches for the file.
        unsafe { self.inner.load_version(file) }
    }

    /// Sets which services run isolated from now on: files loaded later are loaded in that
    /// mode. A running service is moved to its new mode by a hot replace (the reloader does
    /// that at its next rescan).
    pub fn set_isolation(&self, isolation: BTreeMap<String, Isolation>) -> std::io::Result<()> {
        if !isolation.is_empty() && self.inner.config.worker_program.is_none() {
            return Err(no_worker_program());
        }
        *self
            .inner
            .isolation
            .write()
            .unwrap_or_else(|p| p.into_inner()) = isolation;
        Ok(())
    }

    /// How `service` runs now: `Some` with its settings when its current version is
    /// isolated (see [`Kernel::isolation_of`] for how it is configured to run).
    pub fn isolation_in_effect(&self, service: &str) -> Option<Isolation> {
        let slot = self.inner.slot(service)?;
        let isolated = slot.isolated.read().unwrap_or_else(|p| p.into_inner());
        isolated.as_ref().map(|plugin| plugin.settings().clone())
    }

    /// How `service` is to run: `Some` with its settings when isolated.
    pub fn isolation_of(&self, service: &str) -> Option<Isolation> {
        self.inner
            .isolation
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(service)
            .cloned()
    }

    /// How long an operation on a service (start, stop, checkpoint, replace) may wait.
    pub fn operation_timeout(&self) -> Duration {
        self.inner.config.operation_timeout
    }

    /// The state store, if the kernel persists state.
    pub fn state_store(&self) -> Option<&StateStore> {
        self.inner.config.state.as_ref()
    }

    /// Registers a loaded version (a [`crate::loader::Library`], or a plugin prepared for
    /// worker processes) as a new service (not started). `config` is handed to each
    /// instance the service creates.
    pub fn register(
        &self,
        loaded: impl Into<Loaded>,
        config: Option<String>,
    ) -> Result<(), KernelError> {
        let loaded = loaded.into();
        let name = loaded.manifest().name.clone();
        let mut services = self
            .inner
            .services
            .write()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(existing) = services.get(&name) {
            // Not the operations lock: it may be held for a long time, and routing waits
            // on the registry meanwhile.
            return Err(KernelError::DuplicateService {
                service: name,
                first: existing.info().path,
                second: loaded.path().to_owned(),
            });
        }
        let mut info = ServiceInfo {
            name: name.clone(),
            ..ServiceInfo::default()
        };
        info.describe(&loaded);
        let isolated = match &loaded {
            Loaded::Isolated(plugin) => Some(plugin.clone()),
            Loaded::InProcess(_) => None,
        };
        tracing::info!(service = %name, version = %info.version, plugin = %info.path.display(), "registered");
        let slot = ServiceSlot {
            name: name.clone(),
            mailbox: Mailbox::new(self.inner.config.mailbox_capacity),
            info: RwLock::new(info),
            ops: parking_lot::Mutex::new(SlotOps {
                loaded,
                run: Run::Idle(Idle::Registered),
                config,
                last_saved: None,
            }),
            checkpointing: AtomicBool::new(false),
            isolated: RwLock::new(isolated),
        };
        lock(&self.inner.ever_registered).insert(name.clone());
        services.insert(name, Arc::new(slot));
        Ok(())
    }

    /// Loads the plugin file at `path` and registers it.
    ///
    /// # Safety
    ///
    /// As for [`Loader::load`]: the caller vouches for the file.
    pub unsafe fn load(
        &self,
        path: &std::path::Path,
        config: Option<String>,
    ) -> Result<String, KernelError> {
        let file = crate::loader::PluginFile::read(path)?;
        // SAFETY: the caller vouches for the file.
        let loaded = unsafe { self.inner.load_version(&file)? };
        let name = loaded.manifest().name.clone();
        self.register(loaded, config)?;
        Ok(name)
    }

    /// Starts every registered service that is not running, dependencies first (ties broken
    /// by name). Returns the services that could not start, with the reason; the others run.
    pub fn start_all(&self) -> Vec<(String, KernelError)> {
        let all: Vec<String> = self
            .inner
            .slots()
            .iter()
            .filter(|slot| slot.status() != Status::Running)
            .map(|slot| slot.name.clone())
            .collect();
        self.start_new(&all)
    }

    /// Starts the given services (newly registered ones) in dependency order. Returns those
    /// that could not start.
    pub fn start_new(&self, services: &[String]) -> Vec<(String, KernelError)> {
        // In a fleet, what another host runs (or no host yet) is left alone.
        let services: Vec<String> = services
            .iter()
            .filter(|service| self.inner.may_run(service))
            .cloned()
            .collect();
        let services = &services[..];
        let plan = deps::plan(&self.inner.graph());
        let mut failures = Vec::new();
        for (service, error) in plan.blocked {
            if services.contains(&service) {
                if let Some(slot) = self.inner.slot(&service) {
                    if let Ok(mut ops) = slot.lock_ops(self.inner.deadline()) {
                        if let Run::Idle(_) = ops.run {
                            ops.run = Run::Idle(Idle::Failed);
                        }
                        slot.record_error(&error);
                        slot.publish(&ops, None);
                    }
                }
                failures.push((service, KernelError::Dependency(error)));
            }
        }
        for service in plan.order.iter().filter(|s| services.contains(s)) {
            if let Err(error) = self.start(service) {
                failures.push((service.clone(), error));
            }
        }
        for (service, error) in &failures {
            tracing::error!(service, error = %plugin_api::error_chain(error), "not started");
        }
        failures
    }

    /// Starts one service: its dependencies must be running. Restores its state first.
    pub fn start(&self, service: &str) -> Result<(), KernelError> {
        self.inner.start(service)
    }

    /// Stops one service, saving its state; running services that depend on it are stopped
    /// first.
    pub fn stop(&self, service: &str) -> Result<(), KernelError> {
        // In a fleet, a service another host runs (or none) is not this host's to stop.
        self.inner.require_owner(service)?;
        self.inner.stop_with_dependents(service, true)
    }

    /// Stops the service, and the running services that depend on it, without saving their
    /// state: for a host of a fleet that no longer owns them (another host does, and their
    /// state is its to write).
    pub fn relinquish(&self, service: &str) -> Result<(), KernelError> {
        self.inner.stop_with_dependents(service, false)
    }

    /// Stops every running service, dependents before their dependencies, saving each
    /// one's state; waits at most the operation timeout in all.
    pub fn stop_all(&self) -> StopReport {
        self.inner
            .stop_all(Instant::now() + self.inner.config.operation_timeout)
    }

    /// Sends a request from outside the host (`from` = `external`) and waits for the reply,
    /// at most `timeout` (the kernel's default when `None`).
    pub fn request(
        &self,
        to: &str,
        kind: &str,
        payload: &[u8],
        timeout: Option<Duration>,
    ) -> Reply {
        let timeout = timeout.unwrap_or(self.inner.config.request_timeout);
        self.inner
            .route_request(None, Vec::new(), to, kind, payload, timeout)
    }

    /// Sends a request from outside the host without waiting for the reply: the reply
    /// comes on the returned [`PendingReply`] (within `timeout`), unless it is known at once
    /// (an unknown service, a mailbox still full after `room`, a request to `kernel`).
    pub fn post_request(
        &self,
        to: &str,
        kind: &str,
        payload: &[u8],
        timeout: Option<Duration>,
        room: Duration,
    ) -> Result<PendingReply, Reply> {
        let timeout = timeout.unwrap_or(self.inner.config.request_timeout);
        self.inner
            .post_request(None, Vec::new(), to, kind, payload, timeout, room)
    }

    /// Queues an event from outside the host.
    pub fn emit(&self, to: &str, kind: &str, payload: &[u8]) -> Result<(), String> {
        self.inner.route_event(None, to, kind, payload)
    }

    /// Every registered service, by name.
    pub fn list(&self) -> Vec<ServiceInfo> {
        self.inner.list()
    }

    /// One service's information.
    pub fn info(&self, service: &str) -> Option<ServiceInfo> {
        self.inner
            .slot(service)
            .map(|slot| self.inner.info_of(&slot))
    }

    /// Every metric, in the Prometheus text format.
    pub fn metrics_text(&self) -> String {
        let inner = &self.inner;
        let mailboxes: Vec<(String, usize)> = inner
            .services
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(name, slot)| (name.clone(), slot.mailbox.tx.len()))
            .collect();
        // The state directory's records, and the states wherever they are kept.
        let written = inner
            .config
            .state
            .as_ref()
            .map_or(0, StateStore::bytes_written)
            + inner
                .config
                .state_backend
                .as_ref()
                .map_or(0, |backend| backend.bytes_written());
        let fleet = inner
            .config
            .placement
            .as_ref()
            .map(|placement| placement.stats())
            .unwrap_or_default();
        inner.metrics.encode(
            &mailboxes,
            [
                written,
                inner.loader.libraries_opened(),
                inner.loader.load_failures(),
            ],
            fleet,
        )
    }

    /// Counters.
    pub fn stats(&self) -> KernelStats {
        KernelStats {
            libraries_opened: self.inner.loader.libraries_opened(),
            state_writes: self
                .inner
                .state_writes
                .load(std::sync::atomic::Ordering::Relaxed),
        }
    }

    /// Checkpoints every running service through its mailbox: exports its state and writes
    /// it when it differs from the last state written. Services are checkpointed side by
    /// side: a busy one holds back only itself. Does nothing without a state store.
    pub fn checkpoint(&self) -> Vec<(String, Result<Checkpoint, KernelError>)> {
        self.inner.checkpoint_all()
    }

    /// Starts a checkpoint of every running service that has none under way, each on a
    /// thread of its own, and returns at once; each outcome is logged. What the daemon's
    /// timer does: it never waits on a plugin.
    pub fn checkpoint_in_background(&self) {
        self.inner.checkpoint_in_background()
    }

    /// Closes the retired libraries that no plugin code can run in any more (see
    /// [`ServiceInfo::pinned`]). Returns how many stay loaded.
    pub fn sweep(&self) -> usize {
        self.inner.sweep()
    }

    /// Replaces a registered service by a new version of its plugin, which gets `config` (the
    /// old version keeps its own if it has to come back). The steps are in `kernel/swap.rs`.
    pub fn replace(
        &self,
        loaded: impl Into<Loaded>,
        config: Option<String>,
    ) -> Result<SwapReport, KernelError> {
        self.inner.replace(loaded.into(), config)
    }

    /// Stops everything (saving state) and closes every library that no plugin code can
    /// run in any more; waits at most the operation timeout. Idempotent; also run on drop.
    pub fn shutdown(&self) -> StopReport {
        self.shutdown_until(Instant::now() + self.inner.config.operation_timeout)
    }

    /// Like [`Kernel::shutdown`], waiting at most until `deadline`. Services that do not
    /// stop by then are abandoned (named in the report): their threads and libraries are
    /// left as they are.
    pub fn shutdown_until(&self, deadline: Instant) -> StopReport {
        self.finish(deadline, true)
    }

    /// Stops everything as [`Kernel::shutdown_until`] does, and leaves every library loaded:
    /// for a process about to end without running its libraries' destructors (which are
    /// plugin code that could hang; the daemon ends with `_exit`).
    pub fn stop_for_exit(&self, deadline: Instant) -> StopReport {
        self.finish(deadline, false)
    }

    fn finish(&self, deadline: Instant, close: bool) -> StopReport {
        let mut report = self.inner.stop_all(deadline);
        let slots: Vec<Arc<ServiceSlot>> = {
            let mut services = self
                .inner
                .services
                .write()
                .unwrap_or_else(|p| p.into_inner());
            std::mem::take(&mut *services).into_values().collect()
        };
        let mut libraries = Vec::new();
        for slot in &slots {
            // An operation still under way (it timed out above) keeps the lock: its library
            // stays, and goes with the process.
            let Ok(mut ops) = slot.lock_ops(Instant::now()) else {
                continue;
            };
            // An instance given up earlier may come out before the deadline: its state is
            // saved then, as any other that comes back in time.
            if let Run::Stuck(stuck) = &mut ops.run {
                stuck.end_until(deadline);
            }
            if let Some(late) = ops.run.reap() {
                let version = ops.loaded.manifest().version.to_string();
                match self.inner.save(slot, &mut ops, &version, &late) {
                    Ok(()) => {
                        report.failures.retain(|(s, _)| *s != slot.name);
                        tracing::info!(service = %slot.name, "saved the state an instance handed over when it came out of plugin code");
                    }
                    Err(error) => report.failures.push((slot.name.clone(), error)),
                }
            }
            let stuck = match std::mem::replace(&mut ops.run, Run::Idle(Idle::Stopped)) {
                Run::Stuck(stuck) => {
                    // Stuck since before the shutdown (a start that hung, an earlier stop):
                    // abandoned too, its thread still in plugin code.
                    if !report.failures.iter().any(|(s, _)| *s == slot.name) {
                        report.failures.push((
                            slot.name.clone(),
                            KernelError::Stuck {
                                service: slot.name.clone(),
                                call: stuck.call(),
                                stuck: stuck.to_string(),
                            },
                        ));
                    }
                    Some(stuck)
                }
                Run::Running(executor) => Some(executor.stuck("shutdown")),
                Run::Idle(_) => None,
            };
            if stuck.is_none() {
                slot.mailbox.drain(&slot.name);
            }
            libraries.push((slot.name.clone(), ops.loaded.clone(), stuck));
        }
        if !close {
            // Kept for the life of the process, slots and all.
            std::mem::forget(slots);
            std::mem::forget(libraries);
            return report;
        }
        // The slots' references go first, so that each library is the retired list's own.
        drop(slots);
        for (service, library, stuck) in libraries {
            self.inner.retire(&service, library, stuck);
        }
        self.inner.sweep();
        report
    }
}

impl Drop for Kernel {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn no_worker_program() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidInput,
        "a service is isolated, but the kernel has no worker program (KernelConfig::worker_program)",
    )
}

#[cfg(test)]
mod tests;
