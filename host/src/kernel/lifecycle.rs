//! Lifecycles: starting a service (restoring its state), stopping it (saving its state),
//! checkpointing it, and the dependency checks these need.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Weak},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crossbeam_channel::bounded;

use super::{
    deps, digest, lock, routing, BadStatePolicy, Checkpoint, DependencyError, KernelError,
    KernelInner, ServiceInfo, ServiceSlot, SlotOps, Status, StopReport,
};
use crate::{
    executor::{self, Envelope, InstanceError, Launch},
    loader::Library,
};

impl KernelInner {
    pub(super) fn weak_self(&self) -> Weak<KernelInner> {
        self.me.clone()
    }

    pub(crate) fn slot(&self, service: &str) -> Option<Arc<ServiceSlot>> {
        self.services
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(service)
            .cloned()
    }

    pub(super) fn slots(&self) -> Vec<Arc<ServiceSlot>> {
        self.services
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    pub(super) fn graph(&self) -> BTreeMap<String, Vec<String>> {
        self.slots()
            .iter()
            .map(|slot| {
                let info = slot.read_info();
                (info.name.clone(), info.dependencies.clone())
            })
            .collect()
    }

    pub(crate) fn list(&self) -> Vec<ServiceInfo> {
        self.slots().iter().map(|slot| slot.info()).collect()
    }

    pub(crate) fn uptime(&self) -> Duration {
        self.started_at.elapsed().unwrap_or_default()
    }

    pub(super) fn require_running_dependencies(
        &self,
        service: &str,
        dependencies: &[String],
    ) -> Result<(), KernelError> {
        for dependency in dependencies {
            let running = self
                .slot(dependency)
                .map(|slot| slot.status() == Status::Running);
            match running {
                Some(true) => {}
                Some(false) => {
                    return Err(KernelError::DependencyNotRunning {
                        service: service.to_owned(),
                        dependency: dependency.clone(),
                    })
                }
                None => {
                    return Err(DependencyError::Missing {
                        service: service.to_owned(),
                        dependency: dependency.clone(),
                    }
                    .into())
                }
            }
        }
        Ok(())
    }

    /// Reads the service's saved state, applying the bad-state policy.
    pub(super) fn restore(
        &self,
        slot: &ServiceSlot,
    ) -> Result<Option<(String, Vec<u8>)>, KernelError> {
        let Some(store) = &self.config.state else {
            return Ok(None);
        };
        match store.load(&slot.name) {
            Ok(saved) => Ok(saved.map(|s| (s.version, s.bytes))),
            Err(source) if self.config.on_bad_state == BadStatePolicy::Quarantine => {
                self.quarantine(slot, &source).map(|()| None)
            }
            Err(source) => Err(KernelError::State {
                service: slot.name.clone(),
                source,
            }),
        }
    }

    /// Moves an unusable state file aside (it is kept) so that the service starts fresh.
    pub(super) fn quarantine(
        &self,
        slot: &ServiceSlot,
        reason: &dyn std::fmt::Display,
    ) -> Result<(), KernelError> {
        let store = self
            .config
            .state
            .as_ref()
            .expect("a state file implies a store");
        let moved = store
            .quarantine(&slot.name)
            .map_err(|source| KernelError::State {
                service: slot.name.clone(),
                source,
            })?;
        tracing::warn!(
            service = %slot.name,
            error = %reason,
            moved_to = %moved.display(),
            "state file unusable: moved aside, starting with fresh state"
        );
        Ok(())
    }

    pub(super) fn launch(
        &self,
        slot: &ServiceSlot,
        library: Arc<Library>,
        config: Option<String>,
        state: Option<(String, Vec<u8>)>,
    ) -> Result<JoinHandle<()>, InstanceError> {
        let services = routing::context(&slot.name, self);
        executor::launch(
            Launch {
                service: slot.name.clone(),
                library,
                services,
                config,
                state,
                timeout: self.config.operation_timeout,
            },
            slot.mailbox.rx.clone(),
        )
    }

    pub(super) fn start(&self, service: &str) -> Result<(), KernelError> {
        let slot = self
            .slot(service)
            .ok_or_else(|| KernelError::UnknownService(service.to_owned()))?;
        let mut ops = lock(&slot.ops);
        if matches!(slot.status(), Status::Running) {
            return Ok(());
        }
        let dependencies = ops.library.manifest().dependencies.clone();
        let result = self
            .require_running_dependencies(service, &dependencies)
            .and_then(|()| self.start_locked(&slot, &mut ops));
        if let Err(error) = &result {
            slot.fail(&error.to_string());
            // Nothing will serve what queued meanwhile, unless a stuck instance still owns
            // the mailbox (it has a Stop to read there).
            if ops.stuck.is_none() {
                slot.mailbox.drain(service);
            }
        }
        result
    }

    pub(super) fn start_locked(
        &self,
        slot: &ServiceSlot,
        ops: &mut SlotOps,
    ) -> Result<(), KernelError> {
        let _span = tracing::info_span!("start", service = %slot.name).entered();
        if let Some(stuck) = ops.stuck.take() {
            if !stuck.is_finished() {
                ops.stuck = Some(stuck);
                return Err(KernelError::Instance {
                    service: slot.name.clone(),
                    cause: "its previous instance is still stuck in plugin code".into(),
                });
            }
            let _ = stuck.join();
        }
        let state = self.restore(slot)?;
        slot.set_status(Status::Starting);
        let restored = state
            .as_ref()
            .map(|(version, bytes)| (version.clone(), digest(bytes)));
        let launched = match self.launch(slot, ops.library.clone(), ops.config.clone(), state) {
            Err(InstanceError::Import(cause))
                if self.config.on_bad_state == BadStatePolicy::Quarantine =>
            {
                self.quarantine(slot, &format!("import_state refused it: {cause}"))?;
                self.launch(slot, ops.library.clone(), ops.config.clone(), None)
                    .map(|thread| (thread, None))
            }
            other => other.map(|thread| (thread, restored)),
        };
        match launched {
            Ok((thread, restored)) => {
                ops.executor = Some(thread);
                ops.last_saved = restored;
                slot.update(|info| {
                    info.status = Status::Running;
                    info.last_error = None;
                });
                tracing::info!(service = %slot.name, version = %ops.library.manifest().version, "running");
                Ok(())
            }
            Err(InstanceError::Import(cause)) => Err(KernelError::StartFailed {
                service: slot.name.clone(),
                cause: format!(
                    "import_state refused the state in {}: {cause}",
                    self.config
                        .state
                        .as_ref()
                        .map(|s| s.path(&slot.name).display().to_string())
                        .unwrap_or_default()
                ),
            }),
            Err(error) => Err(KernelError::StartFailed {
                service: slot.name.clone(),
                cause: error.to_string(),
            }),
        }
    }

    /// Running services that depend on `service`, directly or not, dependents last.
    pub(super) fn running_dependents(&self, service: &str) -> Vec<String> {
        let graph = self.graph();
        let plan = deps::plan(&graph);
        let mut affected = BTreeSet::from([service.to_owned()]);
        for name in &plan.order {
            if graph[name].iter().any(|d| affected.contains(d)) {
                affected.insert(name.clone());
            }
        }
        plan.order
            .into_iter()
            .filter(|name| name != service && affected.contains(name))
            .filter(|name| {
                self.slot(name)
                    .is_some_and(|s| s.status() == Status::Running)
            })
            .collect()
    }

    pub(super) fn stop_with_dependents(&self, service: &str) -> Result<(), KernelError> {
        let slot = self
            .slot(service)
            .ok_or_else(|| KernelError::UnknownService(service.to_owned()))?;
        for dependent in self.running_dependents(service).into_iter().rev() {
            if let Some(dependent) = self.slot(&dependent) {
                tracing::info!(service = %dependent.name, because = service, "stopping a dependent first");
                self.stop_one(&dependent)?;
            }
        }
        self.stop_one(&slot)
    }

    pub(super) fn stop_all(&self) -> StopReport {
        let plan = deps::plan(&self.graph());
        let mut order = plan.order;
        // Services that could not be planned may still run (started before a cycle appeared).
        order.extend(plan.blocked.into_keys());
        let mut report = StopReport::default();
        for service in order.into_iter().rev() {
            let Some(slot) = self.slot(&service) else {
                continue;
            };
            if slot.status() != Status::Running {
                continue;
            }
            if let Err(error) = self.stop_one(&slot) {
                tracing::error!(service, error = %error, "stop failed");
                report.failures.push((service.clone(), error));
            }
            report.stopped.push(service);
        }
        report
    }

    /// Stops one service's instance, saving its state; leaves its library loaded.
    pub(super) fn stop_one(&self, slot: &ServiceSlot) -> Result<(), KernelError> {
        let mut ops = lock(&slot.ops);
        let Some(thread) = ops.executor.take() else {
            return Ok(());
        };
        let _span = tracing::info_span!("stop", service = %slot.name).entered();
        slot.set_status(Status::Stopping);
        let deadline = Instant::now() + self.config.operation_timeout;
        let (tx, rx) = bounded(1);
        let outcome = slot
            .mailbox
            .tx
            .send_deadline(
                Envelope::Stop {
                    export: self.config.state.is_some(),
                    reply: tx,
                },
                deadline,
            )
            .ok()
            .and_then(|()| rx.recv_deadline(deadline).ok());
        if outcome.is_none() && !thread.is_finished() {
            // Stuck in plugin code: the thread cannot be joined, and its library stays
            // loaded (the instance holds it) so that nothing is unmapped under it.
            let error = format!(
                "did not stop within {:?}; its thread and library are left as they are",
                self.config.operation_timeout
            );
            slot.fail(&error);
            ops.stuck = Some(thread);
            return Err(KernelError::Instance {
                service: slot.name.clone(),
                cause: error,
            });
        }
        let _ = thread.join();
        slot.set_status(Status::Stopped);
        slot.mailbox.drain(&slot.name);
        let Some(outcome) = outcome else {
            return Err(KernelError::Instance {
                service: slot.name.clone(),
                cause: "the executor exited without stopping the instance".into(),
            });
        };
        let mut result = outcome.stopped.map_err(|cause| KernelError::Instance {
            service: slot.name.clone(),
            cause: format!("stop failed: {cause}"),
        });
        if let Some(state) = outcome.state {
            let version = ops.library.manifest().version.to_string();
            let saved = state
                .map_err(|cause| KernelError::Instance {
                    service: slot.name.clone(),
                    cause: format!("export_state failed, state not saved: {cause}"),
                })
                .and_then(|bytes| self.save(slot, &mut ops, &version, &bytes));
            result = saved.and(result);
        }
        if let Err(error) = &result {
            slot.update(|info| info.last_error = Some(error.to_string()));
        }
        tracing::info!(service = %slot.name, "stopped");
        result
    }

    pub(super) fn save(
        &self,
        slot: &ServiceSlot,
        ops: &mut SlotOps,
        version: &str,
        bytes: &[u8],
    ) -> Result<(), KernelError> {
        let Some(store) = &self.config.state else {
            return Ok(());
        };
        store
            .save(&slot.name, version, bytes)
            .map_err(|source| KernelError::State {
                service: slot.name.clone(),
                source,
            })?;
        self.state_writes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        ops.last_saved = Some((version.to_owned(), digest(bytes)));
        Ok(())
    }

    pub(super) fn checkpoint_all(&self) -> Vec<(String, Result<Checkpoint, KernelError>)> {
        if self.config.state.is_none() {
            return Vec::new();
        }
        self.slots()
            .iter()
            .filter(|slot| slot.status() == Status::Running)
            .map(|slot| (slot.name.clone(), self.checkpoint(slot)))
            .collect()
    }

    pub(super) fn checkpoint(&self, slot: &ServiceSlot) -> Result<Checkpoint, KernelError> {
        let mut ops = lock(&slot.ops);
        if ops.executor.is_none() {
            return Ok(Checkpoint::Unchanged);
        }
        let failed = |cause: String| KernelError::Instance {
            service: slot.name.clone(),
            cause: format!("checkpoint failed: {cause}"),
        };
        let timeout = self.config.operation_timeout;
        let deadline = Instant::now() + timeout;
        let (tx, rx) = bounded(1);
        slot.mailbox
            .tx
            .send_deadline(Envelope::Export { reply: tx }, deadline)
            .map_err(|_| failed(format!("the mailbox stayed full for {timeout:?}")))?;
        let bytes = rx
            .recv_deadline(deadline)
            .map_err(|_| failed(format!("the service did not get to it within {timeout:?}")))?
            .map_err(|cause| failed(format!("export_state: {cause}")))?;
        let version = ops.library.manifest().version.to_string();
        if ops.last_saved.as_ref() == Some(&(version.clone(), digest(&bytes))) {
            return Ok(Checkpoint::Unchanged);
        }
        self.save(slot, &mut ops, &version, &bytes)?;
        Ok(Checkpoint::Written)
    }
}
