//! The one seam through which an executor drives a service instance, and through which the
//! instance calls back into the host.
//!
//! - [`InstanceSource`] makes instances: [`crate::loader::Library`] is one, for a plugin
//!   file opened in this process or a service linked into the program
//!   ([`crate::loader::Library::linked`]). A worker process is meant to be another.
//! - [`ServiceInstance`] is one instance as its executor drives it: start, stop, handle,
//!   on_event, export, import, and drop (its `Drop`).
//! - [`HostServices`] is what an instance calls back: log, request, emit. The kernel
//!   implements it once per service.
//!
//! - [`Lane`] is a way into an instance that needs no executor, for an instance whose calls
//!   may come from any thread (a worker process's): a request handled on its requester's
//!   thread while the executor is idle.
//!
//! The executor knows only these traits: nothing of libraries, files or the ABI.
//! Values that cross them are host values (`&str`, `&[u8]`, [`Reply`]); turning them into
//! the plugin ABI's types, and back, is the implementation's business.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use plugin_api::{abi::LogLevel, Reply};

/// What the host offers a service instance, implemented by the kernel for each service.
pub trait HostServices: Send + Sync + 'static {
    /// Records a log line of the plugin.
    fn log(&self, level: LogLevel, target: &str, message: &str);
    /// Routes a request and waits for the reply.
    fn request(&self, to: &str, kind: &str, payload: &[u8], timeout: Duration) -> Reply;
    /// Queues an event.
    fn emit(&self, to: &str, kind: &str, payload: &[u8]) -> Result<(), String>;

    /// The service's last durable state, `(exporting version, bytes)`: what an instance that
    /// lost its worker process restarts from. `None` when there is none (or no store).
    fn saved_state(&self) -> Result<Option<(String, Vec<u8>)>, String> {
        Ok(None)
    }

    /// What an isolated instance's worker process is now, after `event` (started, crashed,
    /// restarted): for the metrics, and the service's last error once it is given up.
    fn process_status(&self, _status: &ProcessStatus, _event: ProcessEvent) {}

    /// Wakes the service's executor, from any thread, without a message for the plugin:
    /// its instance's [`ServiceInstance::answered`] then runs (a worker that died while
    /// idle is restarted at once, not at the next request). Nothing happens when the
    /// mailbox is full (a message is on its way anyway).
    fn nudge(&self) {}

    /// Whether this host may still answer requests for the service: in a fleet, only
    /// while it owns it (its lease certainly valid). A request it may not answer is
    /// refused unhandled, and one handled while the ownership lapsed is refused after.
    fn may_serve(&self) -> bool {
        true
    }
}

/// An isolated instance's worker process, as `list` shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcessStatus {
    /// The worker's process id; `None` while none runs (between a crash and its restart).
    pub pid: Option<u32>,
    /// Workers started again after a crash, since this version was loaded.
    pub restarts: u64,
    /// Workers lost (a signal, an exit, a broken socket, no answer in time).
    pub crashes: u64,
    /// How the last one ended, in words (`killed by SIGSEGV (core dumped) during handle`).
    pub last_crash: Option<String>,
    /// Set once the crashes within the restart window passed the limit: no worker is
    /// started again until the service is started by hand or replaced.
    pub gave_up: bool,
    /// What confines the worker beyond its own process, when asked for (`landlock:
    /// enforced`, or why not).
    pub confined: Option<String>,
}

/// What changed with a [`ProcessStatus`] update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcessEvent {
    /// A worker started for a new instance.
    Started,
    /// The worker was lost.
    Crashed,
    /// A worker started again after a crash.
    Restarted,
}

/// A request or an event, lent to an instance for the length of one call.
#[derive(Debug, Clone, Copy)]
pub struct Message<'a> {
    /// The sending service, or `external`.
    pub from: &'a str,
    /// The receiving service.
    pub to: &'a str,
    /// What it is.
    pub kind: &'a str,
    /// Its bytes.
    pub payload: &'a [u8],
}

/// One service instance, as its executor drives it.
///
/// Made by an [`InstanceSource`] on the executor's thread, called only there (it need not
/// be `Send`: a plugin gets `&mut self` without locks), and dropped there: its `Drop` is the
/// plugin's destructor. Errors are the plugin's own messages.
pub trait ServiceInstance {
    /// The plugin's `start`.
    fn start(&mut self) -> Result<(), String>;
    /// The plugin's `stop`.
    fn stop(&mut self) -> Result<(), String>;
    /// The plugin's `handle`; its failures (a panic included) are a reply with an error code.
    fn handle(&mut self, request: Message<'_>) -> Reply;
    /// The plugin's `on_event`.
    fn on_event(&mut self, event: Message<'_>) -> Result<(), String>;
    /// The plugin's `export_state`.
    fn export_state(&mut self) -> Result<Vec<u8>, String>;
    /// The plugin's `import_state` of a state exported by `from_version`.
    fn import_state(&mut self, from_version: &str, state: &[u8]) -> Result<(), String>;

    /// Whether the last call failed because what runs the instance was lost for a reason
    /// outside the plugin (a worker killed from outside), so that the failure is not held
    /// against the plugin's file. Never, in process.
    fn lost_to_the_host(&self) -> bool {
        false
    }

    /// Whether the last call failed because it did not answer in time (what ran it was
    /// killed for it): a timeout, as a call in process that does not return is. Never, in
    /// process (the executor's own deadline tells).
    fn timed_out(&self) -> bool {
        false
    }

    /// Called by the executor once it has answered a message, before it takes the next:
    /// an instance that lost its worker process brings up another here, while what comes
    /// meanwhile waits in the mailbox. Nothing to do in process.
    fn answered(&mut self) {}

    /// Its [`Lane`], if requests may reach it from other threads while its executor is
    /// idle. None (the default) in process: plugin code runs only on its executor's thread.
    fn lane(&self) -> Option<Arc<dyn Lane>> {
        None
    }
}

/// A way for a requester to have a request handled on its own thread, without the hop to
/// the executor's, while the executor is idle.
///
/// The executor's mailbox lets a lane be used only while nothing is queued and the
/// executor handles nothing (see `executor::Mailbox::through_lane`), so that a lane call
/// and the executor's calls never overlap, and a lane call never overtakes a message
/// posted before it.
pub trait Lane: Send + Sync {
    /// Handles `request`, answering its callbacks on this thread, and gives up waiting at
    /// `deadline`. [`Laned::Refused`] when it cannot now (the requester then posts it to
    /// the mailbox): a lane never waits for a restart.
    fn handle(&self, request: Message<'_>, deadline: Instant) -> Laned;
}

/// What became of a request offered to a [`Lane`].
#[derive(Debug)]
pub enum Laned {
    /// Handled: the reply.
    Replied(Reply),
    /// Handled, but not answered by the deadline: the requester's wait is over (the
    /// instance's own wait for the reply goes on within its deadline).
    TimedOut,
    /// Not taken: the request goes through the mailbox.
    Refused,
}

/// What makes the instances of one version of a service.
pub trait InstanceSource: Send + Sync + 'static {
    /// Creates an instance that calls back through `services`, with its configuration text.
    /// The instance keeps its source alive (a library stays open while an instance of it
    /// exists). Called on the thread that will drive the instance.
    fn create(
        self: Arc<Self>,
        services: Arc<dyn HostServices>,
        config: Option<&str>,
    ) -> Result<Box<dyn ServiceInstance>, CreateError>;
}

/// Why an instance could not be created: the plugin's doing, or the host's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CreateError {
    /// The plugin's constructor failed, or what runs it crashed or hung in it: its
    /// message.
    #[error("{0}")]
    Plugin(String),
    /// What runs the instance could not be had, for a reason outside the plugin (a worker
    /// process that could not start, or was killed from outside): not held against the
    /// plugin's file.
    #[error("{0}")]
    Host(String),
    /// The constructor did not answer in time (what ran it was killed for it).
    #[error("{0}")]
    TimedOut(String),
}

impl From<String> for CreateError {
    fn from(message: String) -> Self {
        CreateError::Plugin(message)
    }
}
