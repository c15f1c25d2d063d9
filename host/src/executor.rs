//! A service's executor: the host-owned thread on which every call into one instance of the
//! service happens, fed by the service's mailbox.
//!
//! The mailbox ([`Mailbox`]) belongs to the service and outlives its instances: during a hot
//! replace the old executor exits, messages keep queueing in the mailbox, and the new
//! executor serves them. An executor thread exits (and its instance is dropped on it) before
//! the kernel closes the instance's library, so that no thread-local destructor registered
//! by the plugin can pin the library.
//!
//! Every wait on an executor has a deadline and goes through one of three functions: [`ask`]
//! (post a message, wait for its answer), [`Pending`]'s stages (an instance being created,
//! importing, starting) and [`Executor::exit`] (wait for the thread to end, thread-local
//! destructors included). An executor that does not answer or end in time is
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
use plugin_api::{abi::RMessage, codes, Reply};

use crate::loader::{threads, HostServices, Instance, Library};

/// A request or an event on its way to a service, in the fewest allocations that carry it:
/// the recipient is the mailbox's service; the sender a shared name, or none for `external`
/// (a reference count shared by every request from outside would bounce between the CPUs,
/// which was half an event's cost); kind and payload one buffer.
pub(crate) struct Letter {
    from: Option<Arc<str>>,
    /// The kind's bytes, then the payload's.
    body: Vec<u8>,
    kind_len: usize,
}

impl Letter {
    /// A letter from `from` (`None`: from outside the host).
    pub fn new(from: Option<Arc<str>>, kind: &str, payload: &[u8]) -> Letter {
        let mut body = Vec::with_capacity(kind.len() + payload.len());
        body.extend_from_slice(kind.as_bytes());
        body.extend_from_slice(payload);
        Letter {
            from,
            body,
            kind_len: kind.len(),
        }
    }

    fn from(&self) -> &str {
        self.from.as_deref().unwrap_or("external")
    }

    fn kind(&self) -> &str {
        // Written from a `&str` in `new`.
        std::str::from_utf8(&self.body[..self.kind_len]).unwrap_or_default()
    }

    /// Lends it to the plugin of `to` for the length of a call.
    fn lend<'a>(&'a self, to: &'a str) -> RMessage<'a> {
        RMessage {
            from: self.from().into(),
            to: to.into(),
            kind: self.kind().into(),
            payload: self.body[self.kind_len..].into(),
        }
    }
}

/// A message for a service's executor.
pub(crate) enum Envelope {
    /// A request; the reply goes back through `reply`.
    Request {
        letter: Letter,
        /// Services waiting, in order, for this request to complete (its call chain).
        chain: Vec<Arc<str>>,
        reply: Sender<Reply>,
        /// When it was posted (its latency is measured from there).
        sent: Instant,
    },
    /// A one-way event.
    Event { letter: Letter },
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
        /// Answered once `stop` returned, after [`Verdict::Stop`].
        stopped: Sender<()>,
        /// Then waited for (until its sender is dropped) before the instance is dropped: a
        /// large instance's drop would compete with the new one's start for the CPUs and
        /// the allocator.
        release: Receiver<()>,
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
    static CHAIN: RefCell<Vec<Arc<str>>> = const { RefCell::new(Vec::new()) };
}

/// The call chain of the current thread (see [`CHAIN`]).
pub(crate) fn current_chain() -> Vec<Arc<str>> {
    CHAIN.with(|chain| chain.borrow().clone())
}

/// Sets the chain to `chain` followed by `me`, reusing the thread's vector.
fn set_chain(chain: &[Arc<str>], me: Option<&Arc<str>>) {
    CHAIN.with(|c| {
        let mut c = c.borrow_mut();
        c.clear();
        c.extend_from_slice(chain);
        c.extend(me.cloned());
    });
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
    /// How long creating, importing and starting may each take.
    pub timeout: Duration,
    /// How long the executor polls its mailbox before it sleeps (see [`recv_soon`]).
    pub spin: Duration,
    /// Where its replies and events are counted.
    pub metrics: crate::metrics::ServiceMetrics,
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

/// Receives from `rx`, waiting at most until `deadline` (for ever when `None`). A message
/// expected soon (a reply, the next request of a busy client) is polled for during `spin`
/// first, giving the CPU away between polls, and only then waited for asleep: waking a
/// sleeping thread costs 30 to 70 µs on a virtual machine, a whole request 2 µs; polling
/// costs the CPU time of a thread that would otherwise be idle, and a thread that shares
/// its CPU with the sender lets it run at once.
pub fn recv_soon<T>(
    rx: &Receiver<T>,
    spin: Duration,
    deadline: Option<Instant>,
) -> Result<T, RecvTimeoutError> {
    if !spin.is_zero() {
        let started = Instant::now();
        loop {
            match rx.try_recv() {
                Ok(message) => return Ok(message),
                Err(crossbeam_channel::TryRecvError::Disconnected) => {
                    return Err(RecvTimeoutError::Disconnected)
                }
                Err(crossbeam_channel::TryRecvError::Empty) => {}
            }
            let now = Instant::now();
            if now - started >= spin || deadline.is_some_and(|d| now >= d) {
                break;
            }
            std::thread::yield_now();
        }
    }
    match deadline {
        Some(deadline) => rx.recv_deadline(deadline),
        None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
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

impl AskError {
    /// Why the executor asked did not answer, in words: `timeout` is how long it was waited
    /// for, `doing` the call it was in. The one place these failures are put in words.
    pub fn reason(self, timeout: Duration, doing: Call) -> String {
        match self {
            AskError::Full => {
                format!("the mailbox stayed full for {timeout:?} (the service was in {doing})")
            }
            AskError::NoAnswer => {
                format!("the service did not get to it within {timeout:?} (it was in {doing})")
            }
            AskError::Closed => "the mailbox is closed".to_owned(),
        }
    }
}

/// Posts the message `make` builds (around the sender of its answer) to `mailbox` and waits
/// for the answer, both before `deadline`. How the kernel asks an executor for an export, a
/// suspension and a stop.
pub(crate) fn ask<T>(
    mailbox: &Sender<Envelope>,
    make: impl FnOnce(Sender<T>) -> Envelope,
    spin: Duration,
    deadline: Instant,
) -> Result<T, AskError> {
    let (tx, rx) = bounded(1);
    match mailbox.send_deadline(make(tx), deadline) {
        Ok(()) => {}
        Err(SendTimeoutError::Timeout(_)) => return Err(AskError::Full),
        Err(SendTimeoutError::Disconnected(_)) => return Err(AskError::Closed),
    }
    recv_soon(&rx, spin, Some(deadline)).map_err(|e| match e {
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

/// The state an instance imports: the version that exported it, and the bytes (shared, so
/// that a hot replace keeps them for a rollback without a copy).
pub(crate) type State = (String, Arc<Vec<u8>>);

/// How long the threads of a hot replace poll for each other before they sleep: the old
/// executor for its verdict, the new one for its go-ahead. A replace is rare and its pause
/// is what users notice; a thread woken from sleep adds tens of microseconds to it.
const HANDOFF_SPIN: Duration = Duration::from_millis(2);

/// An executor thread whose instance exists but does not serve yet: it imports a state when
/// given one ([`Pending::import`]), then starts when told to ([`Pending::start`]). Made
/// before a hot replace suspends the old version, so that neither the thread nor the
/// instance is made while requests are held. Dropped, it drops its instance and ends.
pub(crate) struct Pending {
    executor: Executor,
    /// What the first two stages came to: created, imported.
    stages: Receiver<Result<(), InstanceError>>,
    /// What the last one came to: a rendezvous, so that an instance is told it may serve
    /// only if the kernel takes the news (one it gave up waiting for stops instead).
    started: Receiver<Result<(), InstanceError>>,
    state: Option<Sender<Option<State>>>,
    go: Option<Sender<()>>,
    timeout: Duration,
    spin: Duration,
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending")
            .field("executor", &self.executor)
            .finish_non_exhaustive()
    }
}

/// Starts an executor thread and waits (at most `launch.timeout`) until it has created its
/// instance.
pub(crate) fn prepare(
    launch: Launch,
    mailbox: Receiver<Envelope>,
) -> Result<Pending, LaunchFailure> {
    // Buffered: the thread goes on waiting for its state without waiting for the kernel to
    // read how the creation or the import went (the kernel may be writing the state then).
    let (stages_tx, stages) = bounded::<Result<(), InstanceError>>(2);
    let (started_tx, started) = bounded::<Result<(), InstanceError>>(0);
    let (state_tx, state_rx) = bounded::<Option<State>>(1);
    let (go_tx, go_rx) = bounded::<()>(1);
    let name = format!("svc-{}", launch.service);
    let (timeout, spin) = (launch.timeout, launch.spin);
    let doing = Doing::default();
    let given_up = Arc::new(AtomicBool::new(false));
    let (late_tx, late_state) = bounded(1);
    let epoch = NEXT_EPOCH.fetch_add(1, Ordering::Relaxed);
    let me = Me {
        service: Arc::from(launch.service.as_str()),
        spin: launch.spin,
        metrics: launch.metrics.clone(),
        doing: doing.clone(),
        epoch,
        given_up: given_up.clone(),
        late_state: late_tx,
    };
    let waits = Waits {
        stages: stages_tx,
        started: started_tx,
        state: state_rx,
        go: go_rx,
    };
    let thread = threads::spawn(&name, move || run(launch, mailbox, waits, me)).map_err(|e| {
        LaunchFailure {
            error: InstanceError::Thread(e.to_string()),
            stuck: None,
        }
    })?;
    let pending = Pending {
        executor: Executor {
            thread,
            doing,
            epoch,
            given_up,
            late_state,
        },
        stages,
        started,
        state: Some(state_tx),
        go: Some(go_tx),
        timeout,
        spin,
    };
    pending.stage(Stage::Created)
}

/// The stages of a [`Pending`] executor.
#[derive(Debug, Clone, Copy)]
enum Stage {
    Created,
    Imported,
    Started,
}

impl Pending {
    /// Waits for the outcome of the stage under way; on failure, for the thread to end.
    fn stage(self, stage: Stage) -> Result<Pending, LaunchFailure> {
        let deadline = Instant::now() + self.timeout;
        let (outcomes, waited_for) = match stage {
            Stage::Created => (&self.stages, "the instance to be created"),
            Stage::Imported => (&self.stages, "the state to be imported"),
            Stage::Started => (&self.started, "the instance to start"),
        };
        let error = match recv_soon(outcomes, self.spin, Some(deadline)) {
            Ok(Ok(())) => return Ok(self),
            Ok(Err(error)) => error,
            Err(RecvTimeoutError::Timeout) => {
                // Stuck in plugin code. Dropping the channels tells the thread, if it ever
                // gets out, to drop its instance instead of going on.
                let call = self.executor.doing();
                return Err(LaunchFailure {
                    error: InstanceError::Timeout {
                        call,
                        timeout: self.timeout,
                    },
                    stuck: Some(self.executor.stuck(waited_for)),
                });
            }
            Err(RecvTimeoutError::Disconnected) => {
                InstanceError::Thread("the executor thread exited".into())
            }
        };
        // The instance is being dropped: that is plugin code too.
        let stuck = self
            .executor
            .exit(deadline, "a failed instance to be dropped")
            .err();
        Err(LaunchFailure { error, stuck })
    }

    /// Hands the instance the state to import (`None`: a fresh start), and returns at once:
    /// the import runs while the caller does something else.
    pub fn import(&mut self, state: Option<State>) {
        if let Some(tx) = self.state.take() {
            let _ = tx.send(state);
        }
    }

    /// Waits (at most the timeout) until the state given with [`Pending::import`] is imported.
    pub fn imported(self) -> Result<Pending, LaunchFailure> {
        self.stage(Stage::Imported)
    }

    /// Lets the instance start, and waits (at most the timeout) until it serves.
    pub fn start(mut self) -> Result<Executor, LaunchFailure> {
        if let Some(go) = self.go.take() {
            let _ = go.send(());
        }
        let started = self.stage(Stage::Started)?;
        Ok(started.executor)
    }

    /// Gives it up before it started: it drops its instance and ends. Waits for that until
    /// `deadline`; a thread still in plugin code then is returned.
    pub fn abandon(self, deadline: Instant) -> Option<Stuck> {
        let Pending {
            executor,
            stages,
            started,
            state,
            go,
            ..
        } = self;
        // Closed first: the thread waits on them, and ends when they are.
        drop((stages, started, state, go));
        executor
            .exit(deadline, "an instance given up to be dropped")
            .err()
    }
}

/// Starts an executor thread: it creates the instance, imports the state, starts it, and
/// then serves `mailbox`. Returns once the instance runs, or with the reason it did not.
/// Waits at most `launch.timeout` for each of the three, the exit of a thread that failed
/// included.
pub(crate) fn launch(
    launch: Launch,
    mailbox: Receiver<Envelope>,
    state: Option<State>,
) -> Result<Executor, LaunchFailure> {
    let mut pending = prepare(launch, mailbox)?;
    pending.import(state);
    pending.imported()?.start()
}

/// What an executor thread knows of itself.
struct Me {
    service: Arc<str>,
    spin: Duration,
    metrics: crate::metrics::ServiceMetrics,
    doing: Doing,
    epoch: u64,
    given_up: Arc<AtomicBool>,
    late_state: Sender<Result<Vec<u8>, String>>,
}

/// How a launching executor thread hears from the kernel, and answers.
struct Waits {
    stages: Sender<Result<(), InstanceError>>,
    started: Sender<Result<(), InstanceError>>,
    state: Receiver<Option<State>>,
    go: Receiver<()>,
}

fn run(launch: Launch, mailbox: Receiver<Envelope>, waits: Waits, me: Me) {
    let Launch {
        service,
        library,
        services,
        config,
        timeout: _,
        spin: _,
        metrics: _,
    } = launch;
    let doing = &me.doing;
    set_chain(&[], Some(&me.service));
    let created = doing.call(Call::New, || {
        Instance::new(library, services, config.as_deref())
    });
    let mut instance = match created {
        Ok(instance) => instance,
        Err(e) => {
            let _ = waits.stages.send(Err(InstanceError::Create(e)));
            return;
        }
    };
    // Dropped on this thread before it ends (and, on failure, before the answer, so that
    // the launcher's wait for the exit covers it).
    let drop_it = |instance: Instance| doing.call(Call::Drop, || drop(instance));
    let failed = |error: InstanceError, instance: Instance, to: &Sender<_>| {
        drop_it(instance);
        let _ = to.send(Err(error));
    };
    // The kernel gone from any of these waits gave the instance up.
    if waits.stages.send(Ok(())).is_err() {
        return drop_it(instance);
    }
    let Ok(state) = recv_soon(&waits.state, me.spin, None) else {
        return drop_it(instance);
    };
    if let Some((version, bytes)) = &state {
        let imported = doing.call(Call::ImportState, || instance.import_state(version, bytes));
        if let Err(e) = imported {
            return failed(InstanceError::Import(e), instance, &waits.stages);
        }
    }
    drop(state);
    if waits.stages.send(Ok(())).is_err() {
        return drop_it(instance);
    }
    if recv_soon(&waits.go, HANDOFF_SPIN, None).is_err() {
        return drop_it(instance);
    }
    if let Err(e) = doing.call(Call::Start, || instance.start()) {
        return failed(InstanceError::Start(e), instance, &waits.started);
    }
    if waits.started.send(Ok(())).is_err() {
        // The kernel gave up waiting (see `Pending::stage`): this instance must not serve.
        stop(&service, &mut instance, doing);
    } else {
        me.serve(&mut instance, &mailbox);
    }
    set_chain(&[], None);
    drop_it(instance);
}

impl Me {
    fn given_up(&self) -> bool {
        self.given_up.load(Ordering::Acquire)
    }

    fn serve(&self, instance: &mut Instance, mailbox: &Receiver<Envelope>) {
        let (service, doing) = (&*self.service, &self.doing);
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
            let Ok(envelope) = recv_soon(mailbox, self.spin, None) else {
                return;
            };
            match envelope {
                Envelope::Request {
                    letter,
                    chain,
                    reply,
                    sent,
                } => {
                    set_chain(&chain, Some(&self.service));
                    let answer = doing.call(Call::Handle, || instance.handle(letter.lend(service)));
                    set_chain(&[], Some(&self.service));
                    self.metrics.reply(answer.code, sent.elapsed());
                    // The requester may have timed out and gone: nothing to do then.
                    let _ = reply.send(answer);
                }
                Envelope::Event { letter } => {
                    self.metrics.event();
                    let handled =
                        doing.call(Call::OnEvent, || instance.on_event(letter.lend(service)));
                    if let Err(error) = handled {
                        tracing::warn!(service, kind = letter.kind(), %error, "event handler failed");
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
                    exported,
                    verdict,
                    stopped,
                    release,
                    ..
                } => {
                    let held_since = Instant::now();
                    let state = doing.call(Call::ExportState, || instance.export_state());
                    // The kernel may have given up waiting: then there is nothing to hold for.
                    if exported.send((held_since, state)).is_err() {
                        continue;
                    }
                    // Without a verdict (the kernel went away), resuming loses nothing.
                    if recv_soon(&verdict, HANDOFF_SPIN, None) == Ok(Verdict::Stop) {
                        stop(service, instance, doing);
                        let _ = stopped.send(());
                        let _ = release.recv();
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
