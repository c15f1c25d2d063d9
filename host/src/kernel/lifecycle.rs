//! Lifecycles: starting a service (restoring its state), stopping it (saving its state),
//! checkpointing it, and the dependency checks these need.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{atomic::Ordering, Arc, Weak},
    time::{Duration, Instant},
};

use super::{
    deps, digest, routing, BadStatePolicy, Checkpoint, DependencyError, Idle, KernelError,
    KernelInner, Loaded, Run, ServiceInfo, ServiceSlot, SlotOps, Status, StopReport,
};
use crate::{
    executor::{self, Executor, InstanceError, Launch, LaunchFailure, Pending, State, Stopped},
    loader::threads,
    state::StateBackend,
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
        self.slots().iter().map(|slot| self.info_of(slot)).collect()
    }

    /// What `list` shows of one service.
    pub(super) fn info_of(&self, slot: &ServiceSlot) -> ServiceInfo {
        let mut info = slot.info();
        info.pinned = self.pinned(&slot.name);
        info.process = slot.process();
        info.owner = self
            .config
            .placement
            .as_ref()
            .and_then(|placement| placement.owner_of(&slot.name));
        // An isolated service whose worker died too often serves nothing but `503`s.
        if info.status == Status::Running && info.process.as_ref().is_some_and(|p| p.gave_up) {
            info.status = Status::Failed;
        }
        info
    }

    /// Where service states are kept: a fleet's store, or the state directory; `None`
    /// without persistence.
    pub(crate) fn states(&self) -> Option<&dyn StateBackend> {
        match &self.config.state_backend {
            Some(backend) => Some(&**backend),
            None => self
                .config
                .state
                .as_ref()
                .map(|store| store as &dyn StateBackend),
        }
    }

    /// Whether this host may run `service`: it owns it, or it is not one of a fleet.
    pub(crate) fn may_run(&self, service: &str) -> bool {
        self.config
            .placement
            .as_ref()
            .is_none_or(|placement| placement.owns(service))
    }

    /// Refuses `service` when this host is one of a fleet and does not own it, naming the
    /// node that does, if one is known.
    pub(crate) fn require_owner(&self, service: &str) -> Result<(), KernelError> {
        if self.may_run(service) {
            return Ok(());
        }
        Err(KernelError::NotOwner {
            service: service.to_owned(),
            owner: self.owner_of(service),
        })
    }

    /// The node of the fleet that owns `service`, as last known (never this host unless it
    /// owns it now).
    pub(crate) fn owner_of(&self, service: &str) -> Option<String> {
        self.config.placement.as_ref()?.owner_of(service)
    }

    /// A deadline one operation timeout from now.
    pub(super) fn deadline(&self) -> Instant {
        Instant::now() + self.config.operation_timeout
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
        let Some(store) = self.states() else {
            return Ok(None);
        };
        match store.load(&slot.name) {
            Ok(saved) => Ok(saved.map(|s| (s.version, s.bytes))),
            // Only a file that was read and is bad: one that could not be read (permissions,
            // I/O) may be fine, and is left where it is.
            Err(source)
                if self.config.on_bad_state == BadStatePolicy::Quarantine
                    && source.is_about_content() =>
            {
                self.quarantine(slot, &plugin_api::error_chain(&source))
                    .map(|()| None)
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
        let store = self.states().expect("a state file implies a store");
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

    fn launch_of(&self, slot: &ServiceSlot, loaded: Loaded, config: Option<String>) -> Launch {
        Launch {
            service: slot.name.clone(),
            source: loaded.source(),
            services: routing::context(&slot.name, self),
            config,
            timeout: self.config.operation_timeout,
            spin: self.config.spin,
            metrics: self.metrics.service(&slot.name),
            mailbox: slot.mailbox.clone(),
        }
    }

    /// An executor for `slot` that creates its instance, imports `state` and serves.
    pub(super) fn launch(
        &self,
        slot: &ServiceSlot,
        loaded: Loaded,
        config: Option<String>,
        state: Option<State>,
    ) -> Result<Executor, LaunchFailure> {
        let launch = self.launch_of(slot, loaded, config);
        executor::launch(launch, state)
    }

    /// An executor for `slot` whose instance is created and waits (see [`Pending`]).
    pub(super) fn prepare(
        &self,
        slot: &ServiceSlot,
        loaded: Loaded,
        config: Option<String>,
    ) -> Result<Pending, LaunchFailure> {
        let launch = self.launch_of(slot, loaded, config);
        executor::prepare(launch)
    }

    pub(super) fn start(&self, service: &str) -> Result<(), KernelError> {
        let slot = self
            .slot(service)
            .ok_or_else(|| KernelError::UnknownService(service.to_owned()))?;
        self.require_owner(service)?;
        if slot.gave_up() {
            // An isolated service whose worker crashed too often serves nothing: it is
            // stopped (its state is the last checkpoint, already on disk) and started anew.
            let _ = self.stop_one(&slot, self.deadline());
        }
        let mut ops = slot.lock_ops(self.deadline())?;
        if matches!(ops.run, Run::Running(_)) {
            return Ok(());
        }
        let dependencies = ops.loaded.manifest().dependencies.clone();
        let result = self
            .require_running_dependencies(service, &dependencies)
            .and_then(|()| self.start_locked(&slot, &mut ops));
        if let Err(error) = &result {
            if !matches!(ops.run, Run::Stuck(_)) {
                ops.run = Run::Idle(Idle::Failed);
            }
            slot.record_error(error);
            slot.publish(&ops, None);
            // Nothing will serve what queued meanwhile, unless a stuck instance still owns
            // the mailbox (it has a Stop to read there).
            if !matches!(ops.run, Run::Stuck(_)) {
                slot.mailbox.drain(service);
            }
        }
        result
    }

    /// Starts the service's instance; on failure, `ops.run` says what is left (idle, or a
    /// thread stuck in plugin code).
    pub(super) fn start_locked(
        &self,
        slot: &ServiceSlot,
        ops: &mut SlotOps,
    ) -> Result<(), KernelError> {
        let _span = tracing::info_span!("start", service = %slot.name).entered();
        if let Some(late) = ops.run.reap_until(self.deadline()) {
            // The instance given up at its stop came out later and handed its state over:
            // newer than the file, so it is what the new instance starts from.
            let version = ops.loaded.manifest().version.to_string();
            self.save(slot, ops, &version, &late)?;
            tracing::info!(service = %slot.name, "saved the state an instance handed over when it came out of plugin code");
        }
        if let Run::Stuck(stuck) = &ops.run {
            return Err(KernelError::Stuck {
                service: slot.name.clone(),
                call: stuck.call(),
                stuck: format!("still {stuck}"),
            });
        }
        let state = self
            .restore(slot)?
            .map(|(version, bytes)| (version, Arc::new(bytes)));
        slot.publish(ops, Some(Status::Starting));
        let restored = state
            .as_ref()
            .map(|(version, bytes)| (version.clone(), digest(bytes)));
        let launched = match self.launch(slot, ops.loaded.clone(), ops.config.clone(), state) {
            Err(LaunchFailure {
                error: InstanceError::Import(cause),
                stuck: None,
            }) if self.config.on_bad_state == BadStatePolicy::Quarantine => {
                self.quarantine(slot, &format!("import_state refused it: {cause}"))?;
                self.launch(slot, ops.loaded.clone(), ops.config.clone(), None)
                    .map(|executor| (executor, None))
            }
            other => other.map(|executor| (executor, restored)),
        };
        match launched {
            Ok((executor, restored)) => {
                ops.run = Run::Running(executor);
                ops.last_saved = restored;
                slot.update(|info| info.last_error = None);
                slot.publish(ops, None);
                tracing::info!(service = %slot.name, version = %ops.loaded.manifest().version, "running");
                Ok(())
            }
            Err(LaunchFailure { error, stuck }) => {
                ops.run = match stuck {
                    Some(stuck) => Run::Stuck(stuck),
                    None => Run::Idle(Idle::Failed),
                };
                let state_file = match &error {
                    InstanceError::Import(_) => self.states().map(|s| s.location(&slot.name)),
                    _ => None,
                };
                Err(KernelError::StartFailed {
                    service: slot.name.clone(),
                    cause: error,
                    state_file,
                })
            }
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

    /// Stops the service and, first, the running services that depend on it; saves their
    /// states when `keep_state` (not when another host of the fleet owns them now: their
    /// state is its to write).
    pub(super) fn stop_with_dependents(
        &self,
        service: &str,
        keep_state: bool,
    ) -> Result<(), KernelError> {
        let slot = self
            .slot(service)
            .ok_or_else(|| KernelError::UnknownService(service.to_owned()))?;
        for dependent in self.running_dependents(service).into_iter().rev() {
            if let Some(dependent) = self.slot(&dependent) {
                tracing::info!(service = %dependent.name, because = service, "stopping a dependent first");
                self.stop_one_keeping(&dependent, self.deadline(), keep_state)?;
            }
        }
        self.stop_one_keeping(&slot, self.deadline(), keep_state)
    }

    /// Stops every running service by `deadline`, dependents first: services are stopped in
    /// waves (a service's wave comes after those of every running service that depends on
    /// it), the members of a wave side by side. Each wave gets its share of the time left
    /// before the next one starts; a service still stopping then goes on until `deadline`,
    /// and is abandoned after it.
    pub(super) fn stop_all(&self, deadline: Instant) -> StopReport {
        let graph = self.graph();
        let running: BTreeSet<String> = self
            .slots()
            .iter()
            .filter(|slot| matches!(slot.status(), Status::Running | Status::Starting))
            .map(|slot| slot.name.clone())
            .collect();
        let mut waves = stop_waves(&graph, &running);
        // Within a wave, the reverse of the start order (as a sequential stop would go).
        let order = deps::plan(&graph).order;
        for wave in &mut waves {
            wave.sort_by_key(|s| std::cmp::Reverse(order.iter().position(|o| o == s)));
        }
        let mut report = StopReport::default();
        let outcomes = std::sync::Mutex::new(Vec::new());
        if crate::loader::loader_busy() {
            // A new thread could wait for ever for the dynamic loader's lock (see
            // `loader_busy`): one service after the other, on this thread.
            for service in waves.iter().flatten() {
                if let Some(slot) = self.slot(service) {
                    report.stopped.push(service.clone());
                    let result = self.stop_one(&slot, deadline);
                    super::lock(&outcomes).push((slot.name.clone(), result));
                }
            }
        } else {
            self.stop_in_waves(&waves, deadline, &outcomes, &mut report);
        }
        let mut outcomes = outcomes.into_inner().unwrap_or_else(|p| p.into_inner());
        outcomes.sort_by_key(|(service, _)| report.stopped.iter().position(|s| s == service));
        for (service, result) in outcomes {
            if let Err(error) = result {
                tracing::error!(service, error = %plugin_api::error_chain(&error), "stop failed");
                report.failures.push((service, error));
            }
        }
        report
    }

    /// Stops `waves` one after the other, the members of a wave side by side, each wave
    /// with its share of the time left.
    fn stop_in_waves(
        &self,
        waves: &[Vec<String>],
        deadline: Instant,
        outcomes: &std::sync::Mutex<Vec<(String, Result<(), KernelError>)>>,
        report: &mut StopReport,
    ) {
        std::thread::scope(|scope| {
            for (index, wave) in waves.iter().enumerate() {
                let left = deadline.saturating_duration_since(Instant::now());
                let share = left / u32::try_from(waves.len() - index).unwrap_or(u32::MAX);
                let wave_end = Instant::now() + share;
                let (done_tx, done_rx) = crossbeam_channel::unbounded();
                for service in wave {
                    let Some(slot) = self.slot(service) else {
                        continue;
                    };
                    report.stopped.push(service.clone());
                    let done = done_tx.clone();
                    scope.spawn(move || {
                        threads::adopt_current_thread();
                        let result = self.stop_one(&slot, deadline);
                        super::lock(outcomes).push((slot.name.clone(), result));
                        let _ = done.send(());
                    });
                }
                drop(done_tx);
                // Until every member is done, or the wave's share is spent.
                while done_rx.recv_deadline(wave_end).is_ok() {}
            }
        });
    }

    /// Stops one service's instance by `deadline`, saving its state; leaves its library
    /// loaded. An instance that does not stop in time is left stuck.
    pub(super) fn stop_one(
        &self,
        slot: &ServiceSlot,
        deadline: Instant,
    ) -> Result<(), KernelError> {
        self.stop_one_keeping(slot, deadline, true)
    }

    /// Stops one service; saves its state when `keep_state`.
    fn stop_one_keeping(
        &self,
        slot: &ServiceSlot,
        deadline: Instant,
        keep_state: bool,
    ) -> Result<(), KernelError> {
        let mut ops = slot.lock_ops(deadline)?;
        let Some(executor) = ops.run.take_executor(Idle::Stopped) else {
            return Ok(());
        };
        let _span = tracing::info_span!("stop", service = %slot.name).entered();
        slot.publish(&ops, Some(Status::Stopping));
        // An isolated service whose worker crashed too often has nothing to export: its
        // state is its last checkpoint, already on disk.
        let export = keep_state && self.states().is_some() && !slot.gave_up();
        let Stopped { state, stop, stuck } = executor.stop(export, deadline);
        let mut result = match (&stuck, stop) {
            (Some(stuck), _) => Err(KernelError::Stuck {
                service: slot.name.clone(),
                call: stuck.call(),
                stuck: stuck.to_string(),
            }),
            (None, Ok(())) => Ok(()),
            (None, Err(cause)) => Err(KernelError::Instance {
                service: slot.name.clone(),
                cause: format!("stop failed: {cause}"),
            }),
        };
        match stuck {
            None => slot.mailbox.drain(&slot.name),
            // It still reads the mailbox until it gets to the Stop (if that was posted).
            Some(mut stuck) => {
                // Stopped without saving: what it hands over later is not this host's to
                // save (in a fleet, another host may own the service by then).
                if !keep_state {
                    stuck.discard_late();
                }
                ops.run = Run::Stuck(stuck)
            }
        }
        // A state exported in time is saved, even if `stop` or `drop` then hung.
        if let Some(state) = state {
            let version = ops.loaded.manifest().version.to_string();
            let saved = state
                .map_err(|cause| KernelError::Instance {
                    service: slot.name.clone(),
                    cause: format!("state not saved: {cause}"),
                })
                .and_then(|bytes| self.save_until(slot, &mut ops, &version, &bytes, deadline));
            result = saved.and(result);
        }
        if let Err(error) = &result {
            slot.record_error(error);
        }
        slot.publish(&ops, None);
        match &ops.run {
            Run::Stuck(stuck) => tracing::warn!(service = %slot.name, %stuck, "stop given up"),
            _ => tracing::info!(service = %slot.name, "stopped"),
        }
        result
    }

    /// Saves as [`KernelInner::save`] does; a write that fails (a full disk, a state
    /// directory briefly gone) is tried again until `deadline`: at a stop, the exported
    /// state exists nowhere else.
    pub(super) fn save_until(
        &self,
        slot: &ServiceSlot,
        ops: &mut SlotOps,
        version: &str,
        bytes: &[u8],
        deadline: Instant,
    ) -> Result<(), KernelError> {
        let mut pause = Duration::from_millis(50);
        let mut tries = 1u32;
        loop {
            match self.save(slot, ops, version, bytes) {
                Ok(()) => {
                    if tries > 1 {
                        tracing::info!(service = %slot.name, tries, "state saved after all");
                    }
                    return Ok(());
                }
                Err(error) if Instant::now() + pause < deadline && is_worth_retrying(&error) => {
                    if tries == 1 {
                        tracing::warn!(service = %slot.name, error = %plugin_api::error_chain(&error), until = ?deadline.saturating_duration_since(Instant::now()), "state not saved; trying again");
                    }
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(500));
                    tries += 1;
                }
                Err(error) => return Err(error),
            }
        }
    }

    pub(super) fn save(
        &self,
        slot: &ServiceSlot,
        ops: &mut SlotOps,
        version: &str,
        bytes: &[u8],
    ) -> Result<(), KernelError> {
        let Some(store) = self.states() else {
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
        if self.states().is_none() {
            return Vec::new();
        }
        let slots: Vec<Arc<ServiceSlot>> = self
            .slots()
            .into_iter()
            .filter(|slot| slot.status() == Status::Running && !slot.gave_up())
            .collect();
        let Some((first, others)) = slots.split_first() else {
            return Vec::new();
        };
        // Side by side; the first on this thread (one service starts no thread at all).
        std::thread::scope(|scope| {
            let checkpoints: Vec<_> = others
                .iter()
                .map(|slot| {
                    scope.spawn(move || {
                        threads::adopt_current_thread();
                        (slot.name.clone(), self.checkpoint(slot))
                    })
                })
                .collect();
            let mut all = vec![(first.name.clone(), self.checkpoint(first))];
            all.extend(
                checkpoints
                    .into_iter()
                    .filter_map(|checkpoint| checkpoint.join().ok()),
            );
            all
        })
    }

    pub(super) fn checkpoint_in_background(&self) {
        if self.states().is_none() {
            return;
        }
        for slot in self.slots() {
            if slot.status() != Status::Running
                || slot.gave_up()
                || slot.checkpointing.swap(true, Ordering::AcqRel)
            {
                continue;
            }
            let kernel = self.weak_self();
            let name = format!("checkpoint-{}", slot.name);
            let running = slot.clone();
            let started = threads::spawn_detached(&name, move || {
                if let Some(kernel) = kernel.upgrade() {
                    let result = kernel.checkpoint(&running);
                    log_checkpoint(&running.name, &result);
                }
                running.checkpointing.store(false, Ordering::Release);
            });
            if let Err(error) = started {
                slot.checkpointing.store(false, Ordering::Release);
                tracing::error!(service = %slot.name, %error, "checkpoint not started: no thread for it; retrying at the next tick");
            }
        }
    }

    /// A failure is logged (each tick) and returned, not kept as the service's last error:
    /// a service too busy for one checkpoint is not failed.
    pub(super) fn checkpoint(&self, slot: &ServiceSlot) -> Result<Checkpoint, KernelError> {
        let result = self.checkpoint_once(slot);
        self.metrics.checkpoint(match &result {
            Ok(Checkpoint::Written) => "written",
            Ok(Checkpoint::Unchanged) => "unchanged",
            Err(_) => "failed",
        });
        result
    }

    fn checkpoint_once(&self, slot: &ServiceSlot) -> Result<Checkpoint, KernelError> {
        let deadline = self.deadline();
        let mut ops = slot.lock_ops(deadline)?;
        let Run::Running(executor) = &ops.run else {
            return Ok(Checkpoint::Unchanged);
        };
        let bytes = executor
            .export(deadline)
            .map_err(|cause| KernelError::Instance {
                service: slot.name.clone(),
                cause: format!("checkpoint failed: {cause}"),
            })?;
        let version = ops.loaded.manifest().version.to_string();
        if ops.last_saved.as_ref() == Some(&(version.clone(), digest(&bytes))) {
            return Ok(Checkpoint::Unchanged);
        }
        self.save(slot, &mut ops, &version, &bytes)?;
        Ok(Checkpoint::Written)
    }
}

/// Logs what a checkpoint did.
pub(crate) fn log_checkpoint(service: &str, result: &Result<Checkpoint, KernelError>) {
    match result {
        Ok(Checkpoint::Written) => tracing::debug!(service, "checkpoint written"),
        Ok(Checkpoint::Unchanged) => tracing::trace!(service, "checkpoint unchanged"),
        Err(error) => {
            tracing::error!(service, error = %plugin_api::error_chain(error), "checkpoint failed; retrying at the next tick")
        }
    }
}

/// The waves in which `running` services are stopped: first those no running service
/// depends on, then those whose running dependents are all in earlier waves. Services in a
/// dependency cycle come last, together.
fn stop_waves(
    graph: &BTreeMap<String, Vec<String>>,
    running: &BTreeSet<String>,
) -> Vec<Vec<String>> {
    let mut left: BTreeSet<&String> = running.iter().collect();
    let mut waves = Vec::new();
    while !left.is_empty() {
        let wave: Vec<String> = left
            .iter()
            .filter(|service| {
                !left.iter().any(|other| {
                    other != *service
                        && graph
                            .get(other.as_str())
                            .is_some_and(|deps| deps.contains(service))
                })
            })
            .map(|s| (*s).clone())
            .collect();
        let wave = if wave.is_empty() {
            left.iter().map(|s| (*s).clone()).collect()
        } else {
            wave
        };
        for service in &wave {
            left.remove(service);
        }
        waves.push(wave);
    }
    waves
}

/// Whether a failed save may succeed if tried again: the file system's errors may pass (a
/// disk filled, then freed); a state too big for its header never will.
fn is_worth_retrying(error: &KernelError) -> bool {
    matches!(
        error,
        KernelError::State {
            source: crate::state::StateError::Io { .. },
            ..
        }
    )
}
