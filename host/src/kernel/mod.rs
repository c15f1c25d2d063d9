//! The kernel: the registry of services, their lifecycles, and the routing of requests and
//! events between them.
//!
//! Each registered service has a `ServiceSlot`: its current library, its mailbox (which
//! outlives versions), its executor thread when running, and what `list` shows. Operations
//! that change a service (start, stop, checkpoint, replace) hold the slot's operation lock,
//! so they never interleave; requests never take that lock: they read the status and post to
//! the mailbox.

mod deps;
mod lifecycle;
mod routing;
mod swap;

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{Arc, Mutex, MutexGuard, RwLock},
    thread::JoinHandle,
    time::{Duration, SystemTime},
};

use plugin_api::Reply;
use sha2::{Digest, Sha256};

pub use deps::DependencyError;
pub use swap::{SwapError, SwapReport};

use crate::{
    executor::Mailbox,
    loader::{Library, LoadError, Loader},
    state::{StateError, StateStore},
};

/// The life of a service.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
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
        let text = serde_json::to_value(self).ok();
        f.write_str(text.as_ref().and_then(|v| v.as_str()).unwrap_or("?"))
    }
}

/// What to do with a state file that cannot be opened or imported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
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
        }
    }
}

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
    #[error("service `{service}` failed to start: {cause}")]
    StartFailed {
        /// The service.
        service: String,
        /// Why.
        cause: String,
    },
    /// The service's state could not be read or written.
    #[error("service `{service}`: {source}")]
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
}

/// What `list` shows about a service.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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
    /// The services stopped, in the order they were stopped.
    pub stopped: Vec<String>,
    /// Those whose `stop` failed or whose state could not be saved (they are stopped all
    /// the same).
    pub failures: Vec<(String, KernelError)>,
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
    services: RwLock<BTreeMap<String, Arc<ServiceSlot>>>,
    started_at: SystemTime,
    state_writes: std::sync::atomic::AtomicU64,
}

/// A registered service. Lives from registration until the kernel shuts down.
pub(crate) struct ServiceSlot {
    name: String,
    mailbox: Mailbox,
    /// Held by every operation that changes the service.
    ops: Mutex<SlotOps>,
    /// What requests and `list` read; never held across a call into a plugin.
    info: RwLock<ServiceInfo>,
}

impl std::fmt::Debug for ServiceSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceSlot")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

struct SlotOps {
    library: Arc<Library>,
    executor: Option<JoinHandle<()>>,
    /// The thread of an instance that did not stop in time, until it finishes.
    stuck: Option<JoinHandle<()>>,
    config: Option<String>,
    /// (version, SHA-256) of the state last written or read, to skip unchanged checkpoints.
    last_saved: Option<(String, [u8; 32])>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
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

    fn set_status(&self, status: Status) {
        self.update(|info| info.status = status);
    }

    fn fail(&self, error: &str) {
        self.update(|info| {
            info.status = Status::Failed;
            info.last_error = Some(error.to_owned());
        });
    }
}

impl ServiceInfo {
    /// Takes what `list` shows of a library that was just loaded for the service.
    fn describe(&mut self, library: &Library) {
        let manifest = library.manifest();
        self.version = manifest.version.to_string();
        self.dependencies = manifest.dependencies.clone();
        self.path = library.path().to_owned();
        self.sha256 = hex::encode(library.sha256());
        self.loaded_since = unix_now();
    }
}

impl Kernel {
    /// A kernel with no services.
    pub fn new(config: KernelConfig) -> std::io::Result<Self> {
        let loader = Loader::new(config.shadow_dir.as_deref())?;
        Ok(Kernel {
            inner: Arc::new_cyclic(|me| KernelInner {
                me: me.clone(),
                loader,
                config,
                services: RwLock::new(BTreeMap::new()),
                started_at: SystemTime::now(),
                state_writes: Default::default(),
            }),
        })
    }

    /// The loader, to load plugin files for [`Kernel::register`] and [`Kernel::replace`].
    pub fn loader(&self) -> &Loader {
        &self.inner.loader
    }

    /// The state store, if the kernel persists state.
    pub fn state_store(&self) -> Option<&StateStore> {
        self.inner.config.state.as_ref()
    }

    /// Registers a loaded library as a new service (not started). `config` is handed to
    /// each instance the service creates.
    pub fn register(&self, library: Library, config: Option<String>) -> Result<(), KernelError> {
        let name = library.manifest().name.clone();
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
                second: library.path().to_owned(),
            });
        }
        let mut info = ServiceInfo {
            name: name.clone(),
            ..ServiceInfo::default()
        };
        info.describe(&library);
        tracing::info!(service = %name, version = %info.version, plugin = %info.path.display(), "registered");
        let slot = ServiceSlot {
            name: name.clone(),
            mailbox: Mailbox::new(self.inner.config.mailbox_capacity),
            info: RwLock::new(info),
            ops: Mutex::new(SlotOps {
                library: Arc::new(library),
                executor: None,
                stuck: None,
                config,
                last_saved: None,
            }),
        };
        services.insert(name, Arc::new(slot));
        Ok(())
    }

    /// Loads the plugin file at `path` and registers it.
    pub fn load(
        &self,
        path: &std::path::Path,
        config: Option<String>,
    ) -> Result<String, KernelError> {
        let library = self.inner.loader.load(path)?;
        let name = library.manifest().name.clone();
        self.register(library, config)?;
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
        let plan = deps::plan(&self.inner.graph());
        let mut failures = Vec::new();
        for (service, error) in plan.blocked {
            if services.contains(&service) {
                if let Some(slot) = self.inner.slot(&service) {
                    slot.fail(&error.to_string());
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
            tracing::error!(service, error = %error, "not started");
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
        self.inner.stop_with_dependents(service)
    }

    /// Stops every running service in reverse dependency order, saving each one's state.
    pub fn stop_all(&self) -> StopReport {
        self.inner.stop_all()
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
            .route_request("external", Vec::new(), to, kind, payload, timeout)
    }

    /// Queues an event from outside the host.
    pub fn emit(&self, to: &str, kind: &str, payload: &[u8]) -> Result<(), String> {
        self.inner.route_event("external", to, kind, payload)
    }

    /// Every registered service, by name.
    pub fn list(&self) -> Vec<ServiceInfo> {
        self.inner.list()
    }

    /// One service's information.
    pub fn info(&self, service: &str) -> Option<ServiceInfo> {
        self.inner.slot(service).map(|slot| slot.info())
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
    /// it when it differs from the last state written. Does nothing without a state store.
    pub fn checkpoint(&self) -> Vec<(String, Result<Checkpoint, KernelError>)> {
        self.inner.checkpoint_all()
    }

    /// Replaces a registered service by a new version of its plugin, which gets `config` (the
    /// old version keeps its own if it has to come back). The steps are in `kernel/swap.rs`.
    pub fn replace(
        &self,
        library: Library,
        config: Option<String>,
    ) -> Result<SwapReport, KernelError> {
        self.inner.replace(library, config)
    }

    /// Stops everything (saving state) and closes every library. Idempotent; also run on drop.
    pub fn shutdown(&self) -> StopReport {
        let report = self.inner.stop_all();
        let slots: Vec<Arc<ServiceSlot>> = {
            let mut services = self
                .inner
                .services
                .write()
                .unwrap_or_else(|p| p.into_inner());
            std::mem::take(&mut *services).into_values().collect()
        };
        for slot in slots {
            slot.mailbox.drain(&slot.name);
            match Arc::try_unwrap(slot) {
                Ok(slot) => {
                    let ops = slot.ops.into_inner().unwrap_or_else(|p| p.into_inner());
                    close_library(ops.library);
                }
                Err(slot) => {
                    tracing::warn!(service = %slot.name, "service still referenced at shutdown; its library stays open")
                }
            }
        }
        report
    }
}

impl Drop for Kernel {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Closes a library that nothing else should hold any more; logs when something does.
pub(crate) fn close_library(library: Arc<Library>) -> bool {
    match Arc::try_unwrap(library) {
        Ok(library) => library.close(),
        Err(library) => {
            tracing::warn!(plugin = %library.path().display(), "library still referenced; not closed");
            false
        }
    }
}
