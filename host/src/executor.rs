//! A service's executor: the host-owned thread on which every call into one instance of the
//! service happens, fed by the service's mailbox.
//!
//! The mailbox ([`Mailbox`]) belongs to the service and outlives its instances: during a hot
//! replace the old executor exits, messages keep queueing in the mailbox, and the new
//! executor serves them. An executor thread exits (and its instance is dropped on it) before
//! the kernel closes the instance's library, so that no thread-local destructor registered
//! by the plugin can pin the library.

use std::{
    cell::RefCell,
    sync::Arc,
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender};
use plugin_api::{codes, Message, Reply};

use crate::loader::{HostServices, Instance, Library};

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
    /// Export the state (a checkpoint); the instance keeps running.
    Export {
        reply: Sender<Result<Vec<u8>, String>>,
    },
    /// Export the state, then wait for a verdict without serving anything else: stop (the
    /// state is safe, the instance is being replaced) or resume. The export comes with the
    /// moment the executor stopped serving.
    Suspend {
        exported: Sender<(Instant, Result<Vec<u8>, String>)>,
        verdict: Receiver<Verdict>,
    },
    /// Optionally export the state, then stop the instance and exit.
    Stop {
        export: bool,
        reply: Sender<StopOutcome>,
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

/// The result of [`Envelope::Stop`].
pub(crate) struct StopOutcome {
    pub state: Option<Result<Vec<u8>, String>>,
    pub stopped: Result<(), String>,
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
                Envelope::Export { reply } => {
                    let _ = reply.send(Err(format!("service `{service}` is not running")));
                }
                Envelope::Suspend { exported, .. } => {
                    let _ = exported.send((
                        Instant::now(),
                        Err(format!("service `{service}` is not running")),
                    ));
                }
                Envelope::Stop { reply, .. } => {
                    let _ = reply.send(StopOutcome {
                        state: None,
                        stopped: Ok(()),
                    });
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

/// Why an instance did not come up.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum InstanceError {
    #[error("creating the instance failed: {0}")]
    Create(String),
    #[error("import_state refused the state: {0}")]
    Import(String),
    #[error("start failed: {0}")]
    Start(String),
    #[error("the executor thread could not be started: {0}")]
    Thread(String),
    #[error("creating, importing and starting the instance took longer than {0:?}")]
    Timeout(Duration),
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

/// Starts an executor thread: it creates the instance, imports the state, starts it, and
/// then serves `mailbox`. Returns once the instance runs, or with the reason it did not (the
/// thread has then exited and been joined).
pub(crate) fn launch(
    launch: Launch,
    mailbox: Receiver<Envelope>,
) -> Result<JoinHandle<()>, InstanceError> {
    let (ready_tx, ready_rx) = bounded::<Result<(), InstanceError>>(1);
    let name = format!("svc-{}", launch.service);
    let timeout = launch.timeout;
    let thread = thread::Builder::new()
        .name(name)
        .spawn(move || run(launch, mailbox, ready_tx))
        .map_err(|e| InstanceError::Thread(e.to_string()))?;
    match ready_rx.recv_timeout(timeout) {
        Ok(Ok(())) => Ok(thread),
        Ok(Err(error)) => {
            let _ = thread.join();
            Err(error)
        }
        Err(RecvTimeoutError::Timeout) => {
            // Stuck in plugin code. Dropping `ready_rx` tells the thread, if it ever gets
            // out, to stop its instance instead of serving; it is left to finish alone and
            // keeps its library loaded meanwhile.
            Err(InstanceError::Timeout(timeout))
        }
        Err(RecvTimeoutError::Disconnected) => {
            let _ = thread.join();
            Err(InstanceError::Thread("the executor thread exited".into()))
        }
    }
}

fn run(launch: Launch, mailbox: Receiver<Envelope>, ready: Sender<Result<(), InstanceError>>) {
    let Launch {
        service,
        library,
        services,
        config,
        state,
        timeout: _,
    } = launch;
    set_chain(vec![service.clone()]);
    let mut instance = match Instance::new(library, services, config.as_deref()) {
        Ok(instance) => instance,
        Err(e) => {
            let _ = ready.send(Err(InstanceError::Create(e)));
            return;
        }
    };
    if let Some((version, bytes)) = &state {
        if let Err(e) = instance.import_state(version, bytes) {
            let _ = ready.send(Err(InstanceError::Import(e)));
            return;
        }
    }
    drop(state);
    if let Err(e) = instance.start() {
        let _ = ready.send(Err(InstanceError::Start(e)));
        return;
    }
    if ready.send(Ok(())).is_err() {
        // The kernel gave up waiting (see `launch`): this instance must not serve.
        stop(&service, &mut instance);
        return;
    }
    serve(&service, &mut instance, &mailbox);
    set_chain(Vec::new());
    // `instance` is dropped here, on this thread, before the thread exits.
}

fn serve(service: &str, instance: &mut Instance, mailbox: &Receiver<Envelope>) {
    for envelope in mailbox.iter() {
        match envelope {
            Envelope::Request {
                message,
                mut chain,
                reply,
            } => {
                chain.push(service.to_owned());
                set_chain(chain);
                let answer = instance.handle(message);
                set_chain(vec![service.to_owned()]);
                // The requester may have timed out and gone: nothing to do then.
                let _ = reply.send(answer);
            }
            Envelope::Event { message } => {
                let kind = message.kind.clone();
                if let Err(error) = instance.on_event(message) {
                    tracing::warn!(service, kind, %error, "event handler failed");
                }
            }
            Envelope::Export { reply } => {
                let _ = reply.send(instance.export_state());
            }
            Envelope::Suspend { exported, verdict } => {
                let held_since = Instant::now();
                // The kernel may have given up waiting: then there is nothing to hold for.
                if exported
                    .send((held_since, instance.export_state()))
                    .is_err()
                {
                    continue;
                }
                // Without a verdict (the kernel went away), resuming loses nothing.
                if verdict.recv() == Ok(Verdict::Stop) {
                    stop(service, instance);
                    return;
                }
            }
            Envelope::Stop { export, reply } => {
                let state = export.then(|| instance.export_state());
                let stopped = instance.stop();
                let _ = reply.send(StopOutcome { state, stopped });
                return;
            }
        }
    }
}

fn stop(service: &str, instance: &mut Instance) {
    if let Err(error) = instance.stop() {
        tracing::warn!(service, %error, "stop failed; the instance is dropped anyway");
    }
}
