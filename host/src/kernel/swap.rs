//! Hot replace: a running service gets a new version of its plugin, keeping its state and
//! its mailbox, or keeps its old version if anything goes wrong.
//!
//! Order (ARCHITECTURE.md has the reasoning):
//! 1. the new library is already loaded and checked (a failure there changed nothing);
//! 2. its dependencies must run, or nothing is touched;
//! 3. the executor is suspended through the mailbox: it exports the state after every
//!    request queued before, then holds (requests queue behind it);
//! 4. the state is sealed and written durably; on failure the old instance resumes;
//! 5. the old instance stops and its executor exits;
//! 6. a new executor creates the new instance, imports the state, starts it and serves the
//!    mailbox: the requests held meanwhile go to the new version;
//! 7. if 6 fails, the new library is closed and a fresh instance of the old version imports
//!    the same state and serves instead;
//! 8. the library that is no longer used is closed and checked to be unmapped.

use std::{sync::Arc, time::Duration, time::Instant};

use crossbeam_channel::bounded;

use super::{close_library, lock, KernelError, KernelInner, ServiceSlot, Status};
use crate::{
    executor::{Envelope, Verdict},
    loader::Library,
};

/// Why a hot replace did not happen, or rolled back. In every case the old version serves.
#[derive(Debug, thiserror::Error)]
pub enum SwapError {
    /// The old version could not export its state: it keeps serving.
    #[error("service `{service}` not replaced: export_state of version {version} failed: {cause}")]
    Export {
        /// The service.
        service: String,
        /// The running version.
        version: String,
        /// Why.
        cause: String,
    },
    /// The state could not be written durably: the old version keeps serving.
    #[error("service `{service}` not replaced: its state could not be saved: {source}")]
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
        cause: String,
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
        cause: String,
        /// Why the old version failed to restart.
        rollback: String,
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
    /// Whether the old library is gone from the address space.
    pub unmapped: bool,
}

impl KernelInner {
    pub(super) fn replace(
        &self,
        new: Library,
        config: Option<String>,
    ) -> Result<SwapReport, KernelError> {
        let service = new.manifest().name.clone();
        let slot = self
            .slot(&service)
            .ok_or_else(|| KernelError::UnknownService(service.clone()))?;
        let mut ops = lock(&slot.ops);
        let new = Arc::new(new);
        let from = ops.library.manifest().version.to_string();
        let to = new.manifest().version.to_string();
        let _span =
            tracing::info_span!("reload", service = %service, from = %from, to = %to).entered();

        let dependencies = new.manifest().dependencies.clone();
        if let Err(error) = self.require_running_dependencies(&service, &dependencies) {
            close_library(new);
            return Err(error);
        }

        if ops.executor.is_none() {
            // Not running: swap the library, and start the new version unless the service
            // was stopped on purpose.
            let old = std::mem::replace(&mut ops.library, new);
            ops.config = config;
            set_library(&slot, &ops.library);
            let unmapped = close_library(old);
            let status = slot.status();
            drop(ops);
            if matches!(status, Status::Failed | Status::Registered) {
                self.start(&service)?;
            }
            return Ok(SwapReport {
                service,
                from,
                to,
                held: Duration::ZERO,
                unmapped,
            });
        }

        // 3. Suspend: the export follows every request queued before it.
        let (exported_tx, exported_rx) = bounded(1);
        let (verdict_tx, verdict_rx) = bounded(1);
        let suspended = slot
            .mailbox
            .tx
            .send(Envelope::Suspend {
                exported: exported_tx,
                verdict: verdict_rx,
            })
            .is_ok();
        let timeout = self.config.operation_timeout;
        let (held_since, exported) = if suspended {
            exported_rx.recv_timeout(timeout).unwrap_or_else(|_| {
                // Dropping `exported_rx` tells the executor not to hold when it gets there.
                (
                    Instant::now(),
                    Err(format!("the service did not get to it within {timeout:?}")),
                )
            })
        } else {
            (Instant::now(), Err("the mailbox is closed".into()))
        };
        drop(exported_rx);
        let bytes = match exported {
            Ok(bytes) => bytes,
            Err(cause) => {
                let _ = verdict_tx.send(Verdict::Resume);
                close_library(new);
                return Err(SwapError::Export {
                    service,
                    version: from,
                    cause,
                }
                .into());
            }
        };

        // 4. Persist, or resume the old instance.
        if let Some(store) = &self.config.state {
            if let Err(source) = store.save(&service, &from, &bytes) {
                let _ = verdict_tx.send(Verdict::Resume);
                close_library(new);
                let error = SwapError::Persist { service, source };
                slot.update(|info| info.last_error = Some(error.to_string()));
                return Err(error.into());
            }
            self.state_writes
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }

        // 5. Stop the old instance; its executor exits.
        let _ = verdict_tx.send(Verdict::Stop);
        if let Some(thread) = ops.executor.take() {
            let _ = thread.join();
        }

        // 6. The new version, or 7. the old one again.
        let state = Some((from.clone(), bytes));
        match self.launch(&slot, new.clone(), config.clone(), state.clone()) {
            Ok(thread) => {
                let held = held_since.elapsed();
                ops.executor = Some(thread);
                ops.config = config;
                ops.last_saved = None;
                let old = std::mem::replace(&mut ops.library, new);
                set_library(&slot, &ops.library);
                slot.update(|info| {
                    info.swaps += 1;
                    info.last_error = None;
                });
                // 8. Nothing runs the old code any more.
                let unmapped = close_library(old);
                tracing::info!(held_us = held.as_micros() as u64, unmapped, "replaced");
                Ok(SwapReport {
                    service,
                    from,
                    to,
                    held,
                    unmapped,
                })
            }
            Err(failure) => {
                let cause = failure.to_string();
                close_library(new);
                tracing::error!(%cause, "new version failed; rolling back");
                // The old version comes back as it ran: its library, its configuration.
                match self.launch(&slot, ops.library.clone(), ops.config.clone(), state) {
                    Ok(thread) => {
                        ops.executor = Some(thread);
                        let error = SwapError::RolledBack {
                            service,
                            old: from,
                            new: to,
                            cause,
                        };
                        slot.update(|info| info.last_error = Some(error.to_string()));
                        Err(error.into())
                    }
                    Err(rollback) => {
                        let error = SwapError::RollbackFailed {
                            service,
                            old: from,
                            new: to,
                            cause,
                            rollback: rollback.to_string(),
                        };
                        slot.fail(&error.to_string());
                        slot.mailbox.drain(&slot.name);
                        Err(error.into())
                    }
                }
            }
        }
    }
}

fn set_library(slot: &ServiceSlot, library: &Library) {
    slot.update(|info| info.describe(library));
}
