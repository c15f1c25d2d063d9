//! A service's executor: the host-owned thread on which every call into one instance of the
//! service happens, fed by the service's mailbox.
//!
//! - [`Mailbox`] belongs to the service and outlives its instances: during a hot replace the
//!   old executor exits, messages keep queueing in the mailbox, and the new executor serves
//!   them (`mailbox.rs`).
//! - [`launch`] and [`Pending`] bring an executor up: create the instance, import a state,
//!   start (`launch.rs`).
//! - [`Executor::export`], [`Executor::suspend`] and [`Executor::stop`] are the kernel's
//!   operations on a running executor, each a handshake whose both sides live in `ops.rs`.
//! - `thread.rs` is the executor thread itself: it drives its instance through the seam of
//!   [`crate::instance`] and knows nothing of libraries.
//!
//! An executor thread exits (and its instance is dropped on it) before the kernel closes the
//! instance's library, so that no thread-local destructor registered by the plugin can pin
//! the library.
//!
//! Every wait on an executor has a deadline: an operation's, a [`Pending`] stage's, or
//! [`Executor::exit`]'s (the thread's end, thread-local destructors included). An executor
//! that does not answer or end in time is stuck in plugin code: [`Stuck`] keeps its thread
//! (and, through the instance it owns, its library) and names the call it is in.

mod launch;
mod mailbox;
mod ops;
mod thread;

use std::{
    cell::RefCell,
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

pub(crate) use launch::{launch, prepare, Launch, LaunchFailure, Pending, State};
pub(crate) use mailbox::{Envelope, Letter, Mailbox};
pub use ops::{OperationError, Unanswered};
pub(crate) use ops::{Stopped, Suspension};

use crate::loader::threads;

/// How long the threads of a hot replace poll for each other before they sleep: the old
/// executor for its verdict, the new one for its go-ahead. A replace is rare and its pause
/// is what users notice; a thread woken from sleep adds tens of microseconds to it.
const HANDOFF_SPIN: Duration = Duration::from_millis(2);

thread_local! {
    /// On an executor thread: the call chain of the message being handled (ending with the
    /// executor's own service). Empty on every other thread.
    static CHAIN: RefCell<Vec<Arc<str>>> = const { RefCell::new(Vec::new()) };
}

/// The call chain of the current thread (see [`CHAIN`]).
pub(crate) fn current_chain() -> Vec<Arc<str>> {
    CHAIN.with(|chain| chain.borrow().clone())
}

/// Runs `f` with the thread's chain set to `chain` followed by `me` (a request handled on
/// its requester's thread, through a lane), and gives the thread its own chain back after.
fn with_chain<T>(chain: &[Arc<str>], me: &Arc<str>, f: impl FnOnce() -> T) -> T {
    let own = CHAIN.with(|c| std::mem::take(&mut *c.borrow_mut()));
    set_chain(chain, Some(me));
    let out = f();
    CHAIN.with(|c| *c.borrow_mut() = own);
    out
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

impl Call {
    /// The plugin function's name (`handle`); empty for [`Call::Nothing`].
    pub fn name(self) -> &'static str {
        match self {
            Call::Nothing => "",
            Call::New => "new",
            Call::ImportState => "import_state",
            Call::Start => "start",
            Call::Handle => "handle",
            Call::OnEvent => "on_event",
            Call::ExportState => "export_state",
            Call::Stop => "stop",
            Call::Drop => "drop",
        }
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

    /// Runs `f` (a call into the plugin) with `call` recorded, for the kernel and for the
    /// line the host leaves if the call ends the process (`crate::last_words`).
    fn call<T>(&self, call: Call, f: impl FnOnce() -> T) -> T {
        self.set(call);
        crate::last_words::in_call(call.name());
        let value = f();
        crate::last_words::in_call("");
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
    /// What runs the instance could not be had, for a reason outside the plugin (a worker
    /// process that could not start, or was killed from outside): the host's trouble.
    #[error("the instance could not be brought up (not the plugin's doing): {0}")]
    Unavailable(String),
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

/// A running executor: its thread, what it is doing, and how the kernel tells it that it
/// was given up.
#[derive(Debug)]
pub(crate) struct Executor {
    thread: threads::HostThread,
    doing: Doing,
    epoch: u64,
    given_up: Arc<AtomicBool>,
    /// The state a given-up executor exports when it comes out of plugin code.
    late_state: Receiver<Result<Vec<u8>, OperationError>>,
    /// Where its operations are posted.
    mailbox: Sender<Envelope>,
    /// How long operations' answers are polled for (see [`recv_soon`]).
    spin: Duration,
    /// The operation timeout, named when an operation is not answered.
    timeout: Duration,
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
    late_state: Receiver<Result<Vec<u8>, OperationError>>,
    /// What was waited for.
    waited_for: &'static str,
    /// The plugin function it was in when it was given up.
    given_up_in: Call,
    /// Whether a start or a replace has waited for its hand-over already (once at most).
    waited: bool,
    /// Whether its late state is to be thrown away (it was stopped without saving).
    discard: bool,
}

impl Stuck {
    /// Its late state is thrown away, never saved: it was stopped without saving (in a
    /// fleet, another host owns the service now).
    pub fn discard_late(&mut self) {
        self.discard = true;
    }

    /// Like [`Stuck::late_state`]; but once it has come out of the plugin function it was
    /// given up in (it is exporting its state to hand it over), waits for that state until
    /// `deadline`, the first time only: a thread stuck for good costs one wait, not one per
    /// start.
    pub fn handed_over_until(&mut self, deadline: Instant) -> Option<Vec<u8>> {
        let coming_out = self.given_up_in != Call::Nothing && self.call() != self.given_up_in;
        if !coming_out || self.waited || self.discard {
            return self.late_state();
        }
        self.waited = true;
        self.late_state
            .recv_deadline(deadline)
            .ok()
            .and_then(Result::ok)
    }

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

    /// The state it exported when it came out of plugin code, once it has (never after
    /// [`Stuck::discard_late`]).
    pub fn late_state(&self) -> Option<Vec<u8>> {
        let late = self.late_state.try_recv().ok().and_then(Result::ok);
        late.filter(|_| !self.discard)
    }
}

impl std::fmt::Display for Stuck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let thread = self
            .thread
            .tid()
            .map_or_else(|| "?".to_owned(), |t| t.to_string());
        match self.call() {
            // Out of plugin code since it was given up: it is ending, and goes at the next
            // sweep.
            Call::Nothing => write!(
                f,
                "given up while in plugin code, out of it now and ending (thread {thread}; given up waiting for {})",
                self.waited_for
            ),
            call => write!(
                f,
                "stuck in {call} (thread {thread}; given up waiting for {})",
                self.waited_for
            ),
        }
    }
}

impl Executor {
    /// The plugin function it is in now.
    pub fn doing(&self) -> Call {
        self.doing.get()
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
            given_up_in: self.doing.get(),
            waited: false,
            discard: false,
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

#[cfg(test)]
mod tests;
