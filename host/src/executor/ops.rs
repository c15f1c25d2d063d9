//! The kernel's operations on a running executor: export (a checkpoint), suspend (the hold
//! of a hot replace) and stop. Both sides of each handshake are here: the kernel's side is a
//! method of [`Executor`], the executor thread's side an arm of [`Op::run`], and the
//! channels between them are private to this file.
//!
//! Every operation is meant for the executor of one epoch: another executor of the service
//! drops it unanswered (an operation left in the mailbox for an executor given up must not
//! stop its successor). Every wait has a deadline, and every failure is an
//! [`OperationError`], put in words in one place.

use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, SendTimeoutError, Sender};

use super::{recv_soon, Call, Doing, Envelope, Executor, Stuck, HANDOFF_SPIN};
use crate::instance::ServiceInstance;

/// Why an operation on an executor did not do what was asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OperationError {
    /// The executor did not take the operation, or did not answer, in time.
    #[error("{}", unanswered(*.why, *.timeout, *.doing))]
    Unanswered {
        /// What went wrong.
        why: Unanswered,
        /// How long it was waited for.
        timeout: Duration,
        /// The plugin call the executor was in then.
        doing: Call,
    },
    /// The plugin's call returned an error (or panicked).
    #[error("{call}: {message}")]
    Plugin {
        /// The call.
        call: Call,
        /// The plugin's message.
        message: String,
    },
    /// No executor serves the service any more.
    #[error("the service is not running")]
    NotRunning,
}

/// How an executor failed to answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unanswered {
    /// The mailbox stayed full until the deadline.
    MailboxFull,
    /// The executor did not get to the operation, or did not finish it, by the deadline.
    NoAnswer,
    /// The executor ended without answering.
    Ended,
}

fn unanswered(why: Unanswered, timeout: Duration, doing: Call) -> String {
    match why {
        Unanswered::MailboxFull => {
            format!("the mailbox stayed full for {timeout:?} (the service was in {doing})")
        }
        Unanswered::NoAnswer => {
            format!("the service did not get to it within {timeout:?} (it was in {doing})")
        }
        Unanswered::Ended => "the executor ended without answering".to_owned(),
    }
}

/// An operation in a mailbox.
pub(crate) struct Op {
    epoch: u64,
    kind: Kind,
}

enum Kind {
    /// Export the state; the instance keeps running.
    Export {
        reply: Sender<Result<Vec<u8>, OperationError>>,
    },
    /// Export the state, then wait for a verdict without serving anything else: stop (the
    /// state is safe, the instance is being replaced) or resume. The export comes with the
    /// moment the executor stopped serving.
    Suspend {
        exported: Sender<(Instant, Result<Vec<u8>, OperationError>)>,
        verdict: Receiver<Verdict>,
        /// Answered with `stop`'s outcome once it returned, after [`Verdict::Stop`].
        stopped: Sender<Result<(), OperationError>>,
        /// Then waited for (until its sender is dropped) before the instance is dropped: a
        /// large instance's drop would compete with the new one's start for the CPUs and
        /// the allocator.
        release: Receiver<()>,
    },
    /// Optionally export the state (answered at once, so that a `stop` that hangs does not
    /// hold it back), then stop the instance, answer how that went, and exit.
    Stop {
        export: bool,
        state: Sender<Option<Result<Vec<u8>, OperationError>>>,
        stopped: Sender<Result<(), OperationError>>,
    },
}

/// What a suspended executor does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// Stop the instance and exit.
    Stop,
    /// Carry on serving.
    Resume,
}

/// What the executor thread does after an operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Flow {
    /// Serve the next message.
    Serve,
    /// The instance is stopped: drop it and end.
    End,
}

/// Calls the plugin's `export_state`, recording the call.
pub(super) fn export(
    instance: &mut dyn ServiceInstance,
    doing: &Doing,
) -> Result<Vec<u8>, OperationError> {
    doing
        .call(Call::ExportState, || instance.export_state())
        .map_err(|message| OperationError::Plugin {
            call: Call::ExportState,
            message,
        })
}

/// Calls the plugin's `stop`, recording the call.
pub(super) fn stop(
    instance: &mut dyn ServiceInstance,
    doing: &Doing,
) -> Result<(), OperationError> {
    doing
        .call(Call::Stop, || instance.stop())
        .map_err(|message| OperationError::Plugin {
            call: Call::Stop,
            message,
        })
}

/// [`stop`] on a path that has nobody to tell: a failure is logged.
pub(super) fn stop_logged(service: &str, instance: &mut dyn ServiceInstance, doing: &Doing) {
    if let Err(error) = stop(instance, doing) {
        tracing::warn!(service, %error, "stop failed; the instance is dropped anyway");
    }
}

impl Op {
    /// The executor thread's side: carries the operation out on `instance`, if it is meant
    /// for the executor of `epoch`.
    pub(super) fn run(self, epoch: u64, instance: &mut dyn ServiceInstance, doing: &Doing) -> Flow {
        if self.epoch != epoch {
            return Flow::Serve;
        }
        match self.kind {
            Kind::Export { reply } => {
                let _ = reply.send(export(instance, doing));
                Flow::Serve
            }
            Kind::Suspend {
                exported,
                verdict,
                stopped,
                release,
            } => {
                let held_since = Instant::now();
                let state = export(instance, doing);
                // The kernel may have given up waiting: then there is nothing to hold for.
                if exported.send((held_since, state)).is_err() {
                    return Flow::Serve;
                }
                // Without a verdict (the kernel went away), resuming loses nothing.
                if recv_soon(&verdict, HANDOFF_SPIN, None) != Ok(Verdict::Stop) {
                    return Flow::Serve;
                }
                let _ = stopped.send(stop(instance, doing));
                let _ = release.recv();
                Flow::End
            }
            Kind::Stop {
                export: wanted,
                state,
                stopped,
            } => {
                let _ = state.send(wanted.then(|| export(instance, doing)));
                let _ = stopped.send(stop(instance, doing));
                Flow::End
            }
        }
    }

    /// Answers it as no executor will: the service is not running (a stop: it is stopped).
    pub(super) fn refuse(self) {
        match self.kind {
            Kind::Export { reply } => {
                let _ = reply.send(Err(OperationError::NotRunning));
            }
            Kind::Suspend { exported, .. } => {
                let _ = exported.send((Instant::now(), Err(OperationError::NotRunning)));
            }
            Kind::Stop { state, stopped, .. } => {
                let _ = state.send(None);
                let _ = stopped.send(Ok(()));
            }
        }
    }
}

/// An old instance that exported its state and holds, serving nothing, until it gets a
/// verdict. Dropped without [`Suspension::stop`], it resumes serving.
pub(crate) struct Suspension {
    held_since: Instant,
    verdict: Option<Sender<Verdict>>,
    stopped: Receiver<Result<(), OperationError>>,
    release: Option<Sender<()>>,
    spin: Duration,
}

/// Dropped, lets a stopped, suspended instance be dropped (see [`Suspension::stop`]).
pub(crate) struct Release(#[expect(dead_code, reason = "held for its drop")] Option<Sender<()>>);

impl Suspension {
    /// The moment the executor stopped serving to export.
    pub fn held_since(&self) -> Instant {
        self.held_since
    }

    /// Tells the old instance to stop, and waits until its `stop` returned, at most until
    /// `deadline`. Returns how `stop` went (`None`: it did not return in time), and what
    /// lets the instance be dropped: until it is, the executor thread waits (so that the
    /// drop does not compete with a new instance's start).
    pub fn stop(mut self, deadline: Instant) -> (Option<Result<(), OperationError>>, Release) {
        if let Some(verdict) = self.verdict.take() {
            let _ = verdict.send(Verdict::Stop);
        }
        let stopped = recv_soon(&self.stopped, self.spin, Some(deadline)).ok();
        (stopped, Release(self.release.take()))
    }
}

impl Drop for Suspension {
    fn drop(&mut self) {
        if let Some(verdict) = self.verdict.take() {
            let _ = verdict.send(Verdict::Resume);
        }
    }
}

/// How [`Executor::stop`] went.
#[derive(Debug)]
pub(crate) struct Stopped {
    /// The state exported before `stop`: `None` when it was not asked for, or did not come
    /// by the deadline.
    pub state: Option<Result<Vec<u8>, OperationError>>,
    /// How `stop` went.
    pub stop: Result<(), OperationError>,
    /// The thread, if it did not end by the deadline (it is in plugin code).
    pub stuck: Option<Stuck>,
}

impl Executor {
    /// Posts an operation and waits for its answer, both before `deadline`.
    fn ask<T>(
        &self,
        make: impl FnOnce(Sender<T>) -> Kind,
        deadline: Instant,
    ) -> Result<T, OperationError> {
        let (tx, rx) = bounded(1);
        let op = Op {
            epoch: self.epoch,
            kind: make(tx),
        };
        let why = match self.mailbox.send_deadline(Envelope::Op(op), deadline) {
            Ok(()) => match recv_soon(&rx, self.spin, Some(deadline)) {
                Ok(answer) => return Ok(answer),
                Err(RecvTimeoutError::Timeout) => Unanswered::NoAnswer,
                Err(RecvTimeoutError::Disconnected) => Unanswered::Ended,
            },
            Err(SendTimeoutError::Timeout(_)) => Unanswered::MailboxFull,
            Err(SendTimeoutError::Disconnected(_)) => Unanswered::Ended,
        };
        Err(self.unanswered(why))
    }

    fn unanswered(&self, why: Unanswered) -> OperationError {
        OperationError::Unanswered {
            why,
            timeout: self.timeout,
            doing: self.doing(),
        }
    }

    /// Exports the state of the running instance, after every message queued before; it
    /// goes on serving.
    pub fn export(&self, deadline: Instant) -> Result<Vec<u8>, OperationError> {
        self.ask(|reply| Kind::Export { reply }, deadline)?
    }

    /// Exports the state after every message queued before, and holds the instance, serving
    /// nothing, until the [`Suspension`] says what next. On an error the instance serves on.
    pub fn suspend(&self, deadline: Instant) -> Result<(Suspension, Vec<u8>), OperationError> {
        let (verdict_tx, verdict) = bounded(1);
        let (stopped_tx, stopped) = bounded(1);
        let (release_tx, release) = bounded(0);
        // Had it answered after the deadline, it would have found nobody waiting and gone
        // on serving.
        let (held_since, exported) = self.ask(
            |exported| Kind::Suspend {
                exported,
                verdict,
                stopped: stopped_tx,
                release,
            },
            deadline,
        )?;
        let suspension = Suspension {
            held_since,
            verdict: Some(verdict_tx),
            stopped,
            release: Some(release_tx),
            spin: self.spin,
        };
        // On an export error, `suspension` is dropped: the instance resumes.
        let bytes = exported?;
        Ok((suspension, bytes))
    }

    /// Stops the instance after every message queued before (exporting its state first when
    /// `export`), and waits for the thread to end, all by `deadline`.
    pub fn stop(self, export: bool, deadline: Instant) -> Stopped {
        let (stopped_tx, stopped) = bounded(1);
        let state = self.ask(
            |state| Kind::Stop {
                export,
                state,
                stopped: stopped_tx,
            },
            deadline,
        );
        let stop = match stopped.recv_deadline(deadline) {
            Ok(result) => result,
            Err(RecvTimeoutError::Timeout) => Err(self.unanswered(Unanswered::NoAnswer)),
            Err(RecvTimeoutError::Disconnected) => Err(self.unanswered(Unanswered::Ended)),
        };
        let stuck = self.exit(deadline, "the instance to stop").err();
        Stopped {
            state: state.ok().flatten(),
            stop,
            stuck,
        }
    }
}
