//! A service's executor: the host-owned thread on which every call into one instance of the
//! service happens, fed by the service's mailbox.
//!
//! The mailbox ([`Mailbox`]) belongs to the service and outlives its instances: during a hot
//! replace the old executor exits, messages keep queueing in the mailbox, and the new
//! executor serves them. An executor thread exits (and its instance is dropped on it) before
//! the kernel closes the instance's library, so that no thread-local destructor registered
//! by the plugin can pin the library.
//!
//! Every wait on an executor has a deadline and goes through one of two functions: [`ask`]
//! (post a message, wait for its answer) and [`Executor::exit`] (wait for the thread to end,
//! thread-local destructors included). An executor that does not answer or end in time is
//! stuck in plugin code: [`Stuck`] keeps its thread (and, through the instance it owns, its
//! library) and names the call it is in.

use std::{
    cell::RefCell,
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, SendTimeoutError, Sender};
use plugin_api::{codes, Message, Reply};

use crate::loader::{threads, HostServices, Instance, Library};

/// A message for a service's executor.
pub(crate) enum Envelope {
    /// A request; the reply goes back through `reply`.
    Request {
        message: Message,
        /// Services waiting, in order, for this request to complete (its call chain).
        chain: Vec<String>,
        reply: Sender<Reply>,
    },
    /// A one-way event.
    Event { message: Message },
    /// Export the state (a checkpoint); the instance keeps running. Like `Suspend` and
    /// `Stop`, meant for the executor of that epoch only: another one drops it unanswered
    /// (a message left in the mailbox for an executor given up must not stop its successor).
    Export {
        epoch: u64,
        reply: Sender<Result<Vec<u8>, String>>,
    },
    /// Export the state, then wait for a verdict without serving anything else: stop (the
    /// state is safe, the instance is being replaced) or resume. The export comes with the
    /// moment the executor stopped serving.
    Suspend {
        epoch: u64,
        exported: Sender<(Instant, Result<Vec<u8>, String>)>,
        verdict: Receiver<Verdict>,
    },
    /// Optionally export the state (answered at once, so that a `stop` that hangs does not
    /// hold it back), then stop the instance, answer how that went, and exit.
    Stop {
        epoch: u64,
        export: bool,
        state: Sender<Option<Result<Vec<u8>, String>>>,
        stopped: Sender<Result<(), String>>,
    },
}

/// What a suspended executor does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Stop the instance and exit.
    Stop,
    /// Carry on serving.
    Resume,
}

/// A service's mailbox: bounded, owned by the service, shared by its successive executors.
pub(crate) struct Mailbox {
    pub tx: Sender<Envelope>,
    pub rx: Receiver<Envelope>,
}

impl Mailbox {
    /// A mailbox for `capacity` messages (at least one: a zero-capacity channel would refuse
    /// every event).
    pub fn new(capacity: usize) -> Self {
        let (tx, rx) = bounded(capacity.max(1));
        Mailbox { tx, rx }
    }

    /// Answers everything queued with "not running"; used once no executor will serve it.
    pub fn drain(&self, service: &str) {
        let mut dropped_events = 0usize;
        for envelope in self.rx.try_iter() {
            match envelope {
                Envelope::Request { reply, .. } => {
                    let _ = reply.send(Reply::error(
                        codes::NOT_FOUND,
                        format!("service `{service}` is not running"),
                    ));
                }
                Envelope::Event { .. } => dropped_events += 1,
                Envelope::Export { reply, .. } => {
                    let _ = reply.send(Err(format!("service `{service}` is not running")));
                }
                Envelope::Suspend { exported, .. } => {
                    let _ = exported.send((
                        Instant::now(),
                        Err(format!("service `{service}` is not running")),
                    ));
                }
                Envelope::Stop { state, stopped, .. } => {
                    let _ = state.send(None);
                    let _ = stopped.send(Ok(()));
                }
            }
        }
        if dropped_events > 0 {
            tracing::warn!(
                service,
                dropped_events,
                "events discarded: the service is not running"
            );
        }
    }
}

thread_local! {
    /// On an executor thread: the call chain of the message being handled (ending with the
    /// executor's own service). Empty on every other thread.
    static CHAIN: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
}

/// The call chain of the current thread (see [`CHAIN`]).
pub(crate) fn current_chain() -> Vec<String> {
    CHAIN.with(|chain| chain.borrow().clone())
}

fn set_chain(chain: Vec<String>) {
    CHAIN.with(|c| *c.borrow_mut() = chain);
}

/// The plugin function an executor is in, shown when it does not answer in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Call {
    /// Not in plugin code: waiting for its mailbox, or for a verdict.
    Nothing = 0,
    /// The plugin's constructor.
    New,
    /// `import_state`.
    ImportState,
    /// `start`.
    Start,
    /// `handle`.
    Handle,
    /// `on_event`.
    OnEvent,
    /// `export_state`.
    ExportState,
    /// `stop`.
    Stop,
    /// The instance's destructor.
    Drop,
}

impl Call {
    const ALL: [Call; 9] = [
        Call::Nothing,
        Call::New,
        Call::ImportState,
        Call::Start,
        Call::Handle,
        Call::OnEvent,
        Call::ExportState,
        Call::Stop,
        Call::Drop,
    ];

    fn from_u8(value: u8) -> Call {
        Call::ALL
            .get(usize::from(value))
            .copied()
            .unwrap_or(Call::Nothing)
    }
}

impl std::fmt::Display for Call {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Call::Nothing => "no plugin call (between two)",
            Call::New => "`new`",
            Call::ImportState => "`import_state`",
            Call::Start => "`start`",
            Call::Handle => "`handle`",
            Call::OnEvent => "`on_event`",
            Call::ExportState => "`export_state`",
            Call::Stop => "`stop`",
            Call::Drop => "the instance's `drop`",
        })
    }
}

/// What an executor is doing, shared with the kernel.
#[derive(Debug, Clone, Default)]
struct Doing(Arc<AtomicU8>);

impl Doing {
    fn set(&self, call: Call) {
        self.0.store(call as u8, Ordering::Relaxed);
    }

    fn get(&self) -> Call {
        Call::from_u8(self.0.load(Ordering::Relaxed))
    }

    /// Runs `f` (a call into the plugin) with `call` recorded.
    fn call<T>(&self, call: Call, f: impl FnOnce() -> T) -> T {
        self.set(call);
        let value = f();
        self.set(Call::Nothing);
        value
    }
}

/// Why an instance did not come up. The strings are the plugin's own messages.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InstanceError {
    /// The plugin's constructor failed or panicked.
    #[error("creating the instance failed: {0}")]
    Create(String),
    /// `import_state` refused the state, or panicked.
    #[error("import_state refused the state: {0}")]
    Import(String),
    /// `start` failed or panicked.
    #[error("start failed: {0}")]
    Start(String),
    /// No thread could be had for the executor.
    #[error("the executor thread could not be started: {0}")]
    Thread(String),
    /// A call into the plugin did not return in time: the instance is given up (its thread
    /// is left stuck) and never serves.
    #[error("{call} did not return within {timeout:?}")]
    Timeout {
        /// The call.
        call: Call,
        /// The operation timeout.
        timeout: Duration,
    },
}

/// Everything needed to bring up an instance.
pub(crate) struct Launch {
    pub service: String,
    pub library: Arc<Library>,
    pub services: Arc<dyn HostServices>,
    pub config: Option<String>,
    /// State to import before `start`: the version that exported it, and the bytes.
    pub state: Option<(String, Vec<u8>)>,
    /// How long creating, importing and starting may take.
    pub timeout: Duration,
}

/// A running executor: its thread, what it is doing, and how the kernel tells it that it
/// was given up.
#[derive(Debug)]
pub(crate) struct Executor {
    thread: threads::HostThread,
    doing: Doing,
    epoch: u64,
    given_up: Arc<AtomicBool>,
    /// The state a given-up executor exports when it comes out of plugin code.
    late_state: Receiver<Result<Vec<u8>, String>>,
}

/// Tells executors apart: every executor gets the next one.
static NEXT_EPOCH: AtomicU64 = AtomicU64::new(1);

/// An executor thread that did not end (or answer) in time: it is in plugin code, and keeps
/// its instance, and so its library, until it ends. It has been told it was given up: when
/// it comes out of plugin code it serves nothing more, exports its state (see
/// [`Stuck::late_state`]), stops its instance and ends.
#[derive(Debug)]
pub(crate) struct Stuck {
    thread: threads::HostThread,
    doing: Doing,
    late_state: Receiver<Result<Vec<u8>, String>>,
    /// What was waited for.
    waited_for: &'static str,
}

impl Stuck {
    /// The plugin function it is in now.
    pub fn call(&self) -> Call {
        self.doing.get()
    }

    /// Whether it has ended now (and is joined).
    pub fn ended(&mut self) -> bool {
        self.thread.join_until(Instant::now())
    }

    /// Waits until it ends, at most until `deadline`.
    pub fn end_until(&mut self, deadline: Instant) -> bool {
        self.thread.join_until(deadline)
    }

    /// The state it exported when it came out of plugin code, once it has.
    pub fn late_state(&self) -> Option<Vec<u8>> {
        self.late_state.try_recv().ok().and_then(Result::ok)
    }
}

impl std::fmt::Display for Stuck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "stuck in {} (thread {}; given up waiting for {})",
            self.call(),
            self.thread
                .tid()
                .map_or_else(|| "?".to_owned(), |t| t.to_string()),
            self.waited_for
        )
    }
}

impl Executor {
    /// The plugin function it is in now.
    pub fn doing(&self) -> Call {
        self.doing.get()
    }

    /// What the messages meant for this executor carry.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Waits until the thread has ended, at most until `deadline`; `waited_for` says why
    /// (shown if it is stuck).
    pub fn exit(mut self, deadline: Instant, waited_for: &'static str) -> Result<(), Stuck> {
        if self.thread.join_until(deadline) {
            Ok(())
        } else {
            Err(self.stuck(waited_for))
        }
    }

    /// Gives up waiting for it, and tells it so.
    pub fn stuck(self, waited_for: &'static str) -> Stuck {
        self.given_up.store(true, Ordering::Release);
        Stuck {
            thread: self.thread,
            doing: self.doing,
            late_state: self.late_state,
            waited_for,
        }
    }
}

/// Why [`ask`] got no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AskError {
    /// The mailbox stayed full until the deadline.
    Full,
    /// The executor did not answer by the deadline.
    NoAnswer,
    /// Nobody will answer: the mailbox or the answer channel is closed.
    Closed,
}

/// Posts the message `make` builds (around the sender of its answer) to `mailbox` and waits
/// for the answer, both before `deadline`. The one way the kernel talks to an executor.
pub(crate) fn ask<T>(
    mailbox: &Sender<Envelope>,
    make: impl FnOnce(Sender<T>) -> Envelope,
    deadline: Instant,
) -> Result<T, AskError> {
    let (tx, rx) = bounded(1);
    match mailbox.send_deadline(make(tx), deadline) {
        Ok(()) => {}
        Err(SendTimeoutError::Timeout(_)) => return Err(AskError::Full),
        Err(SendTimeoutError::Disconnected(_)) => return Err(AskError::Closed),
    }
    rx.recv_deadline(deadline).map_err(|e| match e {
        RecvTimeoutError::Timeout => AskError::NoAnswer,
        RecvTimeoutError::Disconnected => AskError::Closed,
    })
}

/// Why [`launch`] failed, and the thread it left in plugin code, if any.
#[derive(Debug)]
pub(crate) struct LaunchFailure {
    pub error: InstanceError,
    pub stuck: Option<Stuck>,
}

/// Starts an executor thread: it creates the instance, imports the state, starts it, and
/// then serves `mailbox`. Returns once the instance runs, or with the reason it did not.
/// Waits at most `launch.timeout` in all, the exit of a thread that failed included.
pub(crate) fn launch(
    launch: Launch,
    mailbox: Receiver<Envelope>,
) -> Result<Executor, LaunchFailure> {
    let (ready_tx, ready_rx) = bounded::<Result<(), InstanceError>>(1);
    let name = format!("svc-{}", launch.service);
    let timeout = launch.timeout;
    let deadline = Instant::now() + timeout;
    let doing = Doing::default();
    let given_up = Arc::new(AtomicBool::new(false));
    let (late_tx, late_state) = bounded(1);
    let epoch = NEXT_EPOCH.fetch_add(1, Ordering::Relaxed);
    let me = Me {
        service: launch.service.clone(),
        doing: doing.clone(),
        epoch,
        given_up: given_up.clone(),
        late_state: late_tx,
    };
    let thread =
        threads::spawn(&name, move || run(launch, mailbox, ready_tx, me)).map_err(|e| {
            LaunchFailure {
                error: InstanceError::Thread(e.to_string()),
                stuck: None,
            }
        })?;
    let executor = Executor {
        thread,
        doing,
        epoch,
        given_up,
        late_state,
    };
    let error = match ready_rx.recv_deadline(deadline) {
        Ok(Ok(())) => return Ok(executor),
        Ok(Err(error)) => error,
        Err(RecvTimeoutError::Timeout) => {
            // Stuck in plugin code. Dropping `ready_rx` tells the thread, if it ever gets
            // out, to stop its instance instead of serving.
            drop(ready_rx);
            let call = executor.doing();
            return Err(LaunchFailure {
                error: InstanceError::Timeout { call, timeout },
                stuck: Some(executor.stuck("the instance to start")),
            });
        }
        Err(RecvTimeoutError::Disconnected) => {
            InstanceError::Thread("the executor thread exited".into())
        }
    };
    // The instance is being dropped: that is plugin code too.
    let stuck = executor
        .exit(deadline, "a failed instance to be dropped")
        .err();
    Err(LaunchFailure { error, stuck })
}

/// What an executor thread knows of itself.
struct Me {
    service: String,
    doing: Doing,
    epoch: u64,
    given_up: Arc<AtomicBool>,
    late_state: Sender<Result<Vec<u8>, String>>,
}

fn run(
    launch: Launch,
    mailbox: Receiver<Envelope>,
    ready: Sender<Result<(), InstanceError>>,
    me: Me,
) {
    let Launch {
        service,
        library,
        services,
        config,
        state,
        timeout: _,
    } = launch;
    let doing = &me.doing;
    set_chain(vec![service.clone()]);
    let created = doing.call(Call::New, || {
        Instance::new(library, services, config.as_deref())
    });
    let mut instance = match created {
        Ok(instance) => instance,
        Err(e) => {
            let _ = ready.send(Err(InstanceError::Create(e)));
            return;
        }
    };
    let failed = |error: InstanceError, instance: Instance| {
        // Dropped before the answer, so the launcher's wait for the exit covers it.
        doing.call(Call::Drop, || drop(instance));
        let _ = ready.send(Err(error));
    };
    if let Some((version, bytes)) = &state {
        let imported = doing.call(Call::ImportState, || instance.import_state(version, bytes));
        if let Err(e) = imported {
            return failed(InstanceError::Import(e), instance);
        }
    }
    drop(state);
    if let Err(e) = doing.call(Call::Start, || instance.start()) {
        return failed(InstanceError::Start(e), instance);
    }
    if ready.send(Ok(())).is_err() {
        // The kernel gave up waiting (see `launch`): this instance must not serve.
        stop(&service, &mut instance, doing);
    } else {
        me.serve(&mut instance, &mailbox);
    }
    set_chain(Vec::new());
    // Dropped here, on this thread, before the thread exits.
    doing.call(Call::Drop, || drop(instance));
}

impl Me {
    fn given_up(&self) -> bool {
        self.given_up.load(Ordering::Acquire)
    }

    fn serve(&self, instance: &mut Instance, mailbox: &Receiver<Envelope>) {
        let (service, doing) = (self.service.as_str(), &self.doing);
        loop {
            if self.given_up() {
                // The kernel stopped waiting for this executor (a stop that did not finish in
                // time) and may have started another on the same mailbox: serve nothing more,
                // and hand over the state for the kernel to save.
                let state = doing.call(Call::ExportState, || instance.export_state());
                let _ = self.late_state.send(state);
                stop(service, instance, doing);
                return;
            }
            let Ok(envelope) = mailbox.recv() else {
                return;
            };
            match envelope {
                Envelope::Request {
                    message,
                    mut chain,
                    reply,
                } => {
                    chain.push(service.to_owned());
                    set_chain(chain);
                    let answer = doing.call(Call::Handle, || instance.handle(message));
                    set_chain(vec![service.to_owned()]);
                    // The requester may have timed out and gone: nothing to do then.
                    let _ = reply.send(answer);
                }
                Envelope::Event { message } => {
                    let kind = message.kind.clone();
                    if let Err(error) = doing.call(Call::OnEvent, || instance.on_event(message)) {
                        tracing::warn!(service, kind, %error, "event handler failed");
                    }
                }
                // Meant for another executor of the service: dropped, unanswered.
                Envelope::Export { epoch, .. }
                | Envelope::Suspend { epoch, .. }
                | Envelope::Stop { epoch, .. }
                    if epoch != self.epoch => {}
                Envelope::Export { reply, .. } => {
                    let _ = reply.send(doing.call(Call::ExportState, || instance.export_state()));
                }
                Envelope::Suspend {
                    exported, verdict, ..
                } => {
                    let held_since = Instant::now();
                    let state = doing.call(Call::ExportState, || instance.export_state());
                    // The kernel may have given up waiting: then there is nothing to hold for.
                    if exported.send((held_since, state)).is_err() {
                        continue;
                    }
                    // Without a verdict (the kernel went away), resuming loses nothing.
                    if verdict.recv() == Ok(Verdict::Stop) {
                        stop(service, instance, doing);
                        return;
                    }
                }
                Envelope::Stop {
                    export,
                    state,
                    stopped,
                    ..
                } => {
                    let exported =
                        export.then(|| doing.call(Call::ExportState, || instance.export_state()));
                    let _ = state.send(exported);
                    let _ = stopped.send(doing.call(Call::Stop, || instance.stop()));
                    return;
                }
            }
        }
    }
}

fn stop(service: &str, instance: &mut Instance, doing: &Doing) {
    if let Err(error) = doing.call(Call::Stop, || instance.stop()) {
        tracing::warn!(service, %error, "stop failed; the instance is dropped anyway");
    }
}
