//! Hot replace: a running service gets a new version of its plugin, keeping its state and
//! its mailbox, or keeps its old version if anything goes wrong.
//!
//! Order (ARCHITECTURE.md has the reasoning):
//! 1. the new library is already loaded and checked (a failure there changed nothing);
//! 2. its dependencies must run, or nothing is touched;
//! 3. a new executor thread creates the new instance, which waits: nothing of this is in
//!    the pause (a failure here changed nothing either);
//! 4. the old executor is suspended through the mailbox: it exports the state after every
//!    request queued before, then holds (requests queue behind it). The pause starts;
//! 5. the new instance imports the state while the kernel seals it and writes it durably;
//!    if either fails, the old instance resumes (it never stopped);
//! 6. the old instance stops (its `stop` is waited for until the operation timeout; one
//!    stuck in it is left to end alone, keeping the old library loaded, and the replace goes
//!    on: the state is safe);
//! 7. the new instance starts and serves the mailbox: the requests held meanwhile go to the
//!    new version. The pause ends;
//! 8. if 7 fails, the new library is closed and a fresh instance of the old version imports
//!    the same state and serves instead;
//! 9. the old executor's thread ends (its instance is dropped on it), and the library no
//!    longer used is retired: closed once no plugin code can run in it (see `retired.rs`),
//!    and checked to be unmapped.
//!
//! Every wait on plugin code is bounded by the operation timeout, and every early return
//! after step 4 and before step 6 resumes the old instance (the [`Suspension`] guard).

use std::{sync::Arc, time::Duration};

use super::{Idle, KernelError, KernelInner, Loaded, OpsGuard, Run, ServiceSlot, Status};
use crate::executor::{LaunchFailure, OperationError, State, Stuck, Suspension};

/// Why a hot replace did not happen, or rolled back. In every case the old version serves.
#[derive(Debug, thiserror::Error)]
pub enum SwapError {
    /// The old version could not export its state: it keeps serving.
    #[error(
        "service `{service}` not replaced: version {version} did not export its state: {cause}"
    )]
    Export {
        /// The service.
        service: String,
        /// The running version.
        version: String,
        /// Why.
        cause: OperationError,
    },
    /// The state could not be written durably: the old version keeps serving.
    #[error("service `{service}` not replaced: its state could not be saved")]
    Persist {
        /// The service.
        service: String,
        /// The state store's error.
        #[source]
        source: crate::state::StateError,
    },
    /// The new version failed to come up; the old version serves again with the same state.
    #[error("service `{service}` rolled back to {old}: version {new} failed: {cause}")]
    RolledBack {
        /// The service.
        service: String,
        /// The version serving again.
        old: String,
        /// The version that failed.
        new: String,
        /// Why it failed.
        cause: crate::executor::InstanceError,
    },
    /// The new version failed and so did the old one's restart: the service is down.
    #[error("service `{service}` is down: version {new} failed ({cause}), then restarting {old} failed too ({rollback})")]
    RollbackFailed {
        /// The service.
        service: String,
        /// The old version.
        old: String,
        /// The new version.
        new: String,
        /// Why the new version failed.
        cause: crate::executor::InstanceError,
        /// Why the old version failed to restart.
        rollback: crate::executor::InstanceError,
    },
}

/// What a successful hot replace did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SwapReport {
    /// The service.
    pub service: String,
    /// The version replaced.
    pub from: String,
    /// The version now serving.
    pub to: String,
    /// How long the mailbox was held: from the moment the old instance stopped serving (to
    /// export its state) to the new instance serving. Requests arriving meanwhile waited
    /// this long at most.
    pub held: Duration,
    /// Whether the old library is gone from the address space (`false` when plugin code
    /// may still run in it: it stays loaded until that ends, see [`super::ServiceInfo::pinned`]).
    pub unmapped: bool,
    /// Why the old version's `stop` failed, if it did (the replace went on: the state was
    /// safe and the new version ready).
    pub old_stop_failed: Option<String>,
}

impl KernelInner {
    pub(super) fn replace(
        &self,
        new: Loaded,
        config: Option<String>,
    ) -> Result<SwapReport, KernelError> {
        let service = new.manifest().name.clone();
        let Some(slot) = self.slot(&service) else {
            self.retire(&service, new, None);
            return Err(KernelError::UnknownService(service));
        };
        let mut ops = match slot.lock_ops(self.deadline()) {
            Ok(ops) => ops,
            Err(error) => {
                self.retire(&service, new, None);
                return Err(error);
            }
        };
        let from = ops.loaded.manifest().version.to_string();
        let to = new.manifest().version.to_string();
        let _span =
            tracing::info_span!("reload", service = %service, from = %from, to = %to).entered();

        // 2. Its dependencies run, or nothing is touched.
        let dependencies = new.manifest().dependencies.clone();
        if let Err(error) = self.require_running_dependencies(&service, &dependencies) {
            self.retire(&service, new, None);
            return Err(error);
        }
        if slot.gave_up() {
            // Its worker crashed too often: nothing runs to export from. It is stopped (its
            // state is its last checkpoint, on disk), and the new version starts from that.
            if let Some(executor) = ops.run.take_executor(Idle::Failed) {
                let stopped = executor.stop(false, self.deadline());
                if let Some(stuck) = stopped.stuck {
                    ops.run = Run::Stuck(stuck);
                }
            }
        }
        if !matches!(ops.run, Run::Running(_)) {
            return self.replace_idle(&slot, ops, new, config, from, to);
        }
        let rolled_back = |cause| SwapError::RolledBack {
            service: service.clone(),
            old: from.clone(),
            new: to.clone(),
            cause,
        };

        // 3. The new instance, made before the pause.
        let mut pending = match self.prepare(&slot, new.clone(), config.clone()) {
            Ok(pending) => pending,
            Err(LaunchFailure { error, stuck }) => {
                self.retire(&service, new, stuck);
                let error = rolled_back(error);
                slot.record_error(&error);
                self.metrics.rolled_back(&service);
                return Err(error.into());
            }
        };

        // 4. Suspend: the export follows every request queued before it.
        let (suspension, bytes) = match self.suspend(&ops) {
            Ok(suspended) => suspended,
            Err(cause) => {
                let stuck = pending.abandon(self.deadline());
                self.retire(&service, new, stuck);
                let error = SwapError::Export {
                    service,
                    version: from,
                    cause,
                };
                slot.record_error(&error);
                return Err(error.into());
            }
        };
        let state: State = (from.clone(), Arc::new(bytes));

        // 5. The new instance imports while the state is persisted; if either fails, the old
        // instance resumes (dropping the suspension does).
        pending.import(Some(state.clone()));
        if let Some(store) = self.states() {
            if let Err(source) = store.save(&service, &from, &state.1) {
                drop(suspension);
                let stuck = pending.abandon(self.deadline());
                self.retire(&service, new, stuck);
                let error = SwapError::Persist { service, source };
                slot.record_error(&error);
                return Err(error.into());
            }
            self.state_writes
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let pending = match pending.imported() {
            Ok(pending) => pending,
            Err(LaunchFailure { error, stuck }) => {
                drop(suspension);
                self.retire(&service, new, stuck);
                tracing::error!(cause = %error, "new version failed; the old one goes on");
                let error = rolled_back(error);
                slot.record_error(&error);
                self.metrics.rolled_back(&service);
                return Err(error.into());
            }
        };

        // 6. Stop the old instance: its `stop`, not yet the end of its thread.
        let held_since = suspension.held_since();
        let (stopped, release) = suspension.stop(self.deadline());
        let mut old = ops.run.take_executor(Idle::Failed);
        let mut old_stuck = None;
        // The state is safe and the new version ready: a `stop` that fails is said, and the
        // replace goes on.
        let old_stop_failed = match &stopped {
            Some(Err(error)) => {
                tracing::warn!(service, %error, "the old version's stop failed; it is dropped anyway");
                Some(error.to_string())
            }
            _ => None,
        };
        if stopped.is_none() {
            if let Some(executor) = old.take() {
                let stuck = executor.stuck("the old instance to stop");
                tracing::warn!(service, %stuck, "the old instance did not stop in time; going on, its library stays loaded");
                old_stuck = Some(stuck);
            }
        }

        // 7. The new version serves, or 8. the old one again; 9. the old thread ends.
        let started = pending.start();
        let held = held_since.elapsed();
        drop(release);
        if let Some(executor) = old {
            old_stuck = executor
                .exit(self.deadline(), "the old instance to be dropped")
                .err();
            if let Some(stuck) = &old_stuck {
                tracing::warn!(service, %stuck, "the old instance's thread did not end in time; its library stays loaded");
            }
        }
        self.switch(
            &slot,
            &mut ops,
            (new, config),
            (from, to),
            state,
            (started, held),
            (old_stuck, old_stop_failed),
        )
    }

    /// Step 4: asks the executor to export and hold.
    fn suspend(&self, ops: &OpsGuard<'_>) -> Result<(Suspension, Vec<u8>), OperationError> {
        match &ops.run {
            Run::Running(executor) => executor.suspend(self.deadline()),
            _ => Err(OperationError::NotRunning),
        }
    }

    /// The service is not running (never started, stopped, failed, or stuck): the library is
    /// swapped, and the new version starts unless the service was stopped on purpose.
    fn replace_idle(
        &self,
        slot: &ServiceSlot,
        mut ops: OpsGuard<'_>,
        new: Loaded,
        config: Option<String>,
        from: String,
        to: String,
    ) -> Result<SwapReport, KernelError> {
        // A state handed over by an instance that came out late is newer than the file: saved
        // (as the old version's) for the new version to import.
        if let Some(late) = ops.run.reap_until(self.deadline()) {
            self.save(slot, &mut ops, &from, &late)?;
        }
        let status = ops.run.status();
        // A stuck instance is left to end alone with the old library: a new version may be
        // exactly what it takes to get the service back.
        let idle = match &ops.run {
            Run::Idle(idle) => *idle,
            Run::Stuck(_) | Run::Running(_) => Idle::Failed,
        };
        let stuck = match std::mem::replace(&mut ops.run, Run::Idle(idle)) {
            Run::Stuck(stuck) => Some(stuck),
            other => {
                ops.run = other;
                None
            }
        };
        let old = std::mem::replace(&mut ops.loaded, new);
        ops.config = config;
        set_library(slot, &ops.loaded);
        let unmapped = self.retire(&slot.name, old, stuck);
        drop(ops);
        // In a fleet, a service another host runs is only swapped here: it starts on the
        // host that owns it.
        if matches!(status, Status::Failed | Status::Registered) && self.may_run(&slot.name) {
            self.start(&slot.name)?;
        }
        Ok(SwapReport {
            service: slot.name.clone(),
            from,
            to,
            held: Duration::ZERO,
            unmapped,
            old_stop_failed: None,
        })
    }

    /// Steps 7 to 9: the new version serves, or the old one again.
    #[expect(clippy::too_many_arguments, reason = "the steps' state, passed once")]
    fn switch(
        &self,
        slot: &ServiceSlot,
        ops: &mut OpsGuard<'_>,
        (new, config): (Loaded, Option<String>),
        (from, to): (String, String),
        state: State,
        (started, held): (Result<crate::executor::Executor, LaunchFailure>, Duration),
        (old_stuck, old_stop_failed): (Option<Stuck>, Option<String>),
    ) -> Result<SwapReport, KernelError> {
        let service = slot.name.clone();
        match started {
            Ok(executor) => {
                ops.run = Run::Running(executor);
                ops.config = config;
                ops.last_saved = None;
                let old = std::mem::replace(&mut ops.loaded, new);
                set_library(slot, &ops.loaded);
                slot.update(|info| {
                    info.swaps += 1;
                    info.last_error = old_stop_failed.as_ref().map(|error| {
                        format!("version {from} failed to stop when replaced: {error}")
                    });
                });
                slot.publish(ops, None);
                // 9. Closed once nothing runs the old code any more.
                let unmapped = self.retire(&service, old, old_stuck);
                tracing::info!(held_us = held.as_micros() as u64, unmapped, "replaced");
                self.metrics.swapped(&service, held);
                Ok(SwapReport {
                    service,
                    from,
                    to,
                    held,
                    unmapped,
                    old_stop_failed,
                })
            }
            Err(LaunchFailure {
                error: cause,
                stuck,
            }) => {
                self.retire(&service, new, stuck);
                if let Some(stuck) = old_stuck {
                    // The library it holds serves again below.
                    self.track_stuck(&service, ops.loaded.clone(), stuck);
                }
                tracing::error!(cause = %cause, "new version failed; rolling back");
                // The old version comes back as it ran: its library, its configuration.
                let error =
                    match self.launch(slot, ops.loaded.clone(), ops.config.clone(), Some(state)) {
                        Ok(executor) => {
                            ops.run = Run::Running(executor);
                            SwapError::RolledBack {
                                service,
                                old: from,
                                new: to,
                                cause,
                            }
                        }
                        Err(LaunchFailure {
                            error: rollback,
                            stuck,
                        }) => {
                            ops.run = match stuck {
                                Some(stuck) => Run::Stuck(stuck),
                                None => {
                                    slot.mailbox.drain(&slot.name);
                                    Run::Idle(Idle::Failed)
                                }
                            };
                            SwapError::RollbackFailed {
                                service,
                                old: from,
                                new: to,
                                cause,
                                rollback,
                            }
                        }
                    };
                slot.record_error(&error);
                slot.publish(ops, None);
                self.metrics.rolled_back(&slot.name);
                Err(error.into())
            }
        }
    }
}

fn set_library(slot: &ServiceSlot, loaded: &Loaded) {
    slot.describe(loaded);
}
