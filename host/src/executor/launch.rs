//! Bringing an executor up: its thread creates the instance, imports a state, and starts,
//! each stage waited for with a deadline.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender};

pub(crate) use super::thread::{Launch, State};
use super::{
    recv_soon,
    thread::{self, Me, Waits},
    Doing, Executor, InstanceError, Stuck, NEXT_EPOCH,
};
use crate::loader::threads;

/// Why [`launch`] failed, and the thread it left in plugin code, if any.
#[derive(Debug)]
pub(crate) struct LaunchFailure {
    pub error: InstanceError,
    pub stuck: Option<Stuck>,
}

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
pub(crate) fn prepare(launch: Launch) -> Result<Pending, LaunchFailure> {
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
    let mailbox = launch.mailbox.tx.clone();
    let thread = threads::spawn(&name, move || thread::run(launch, waits, me)).map_err(|e| {
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
            mailbox,
            spin,
            timeout,
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
pub(crate) fn launch(launch: Launch, state: Option<State>) -> Result<Executor, LaunchFailure> {
    let mut pending = prepare(launch)?;
    pending.import(state);
    pending.imported()?.start()
}
