//! Carrying a rescan's plans out: hot replaces side by side, registrations and starts in
//! dependency order, fallbacks, and the verdicts (whose fault a failure is).

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    time::Duration,
};

use super::{Action, Candidate, Plan, Rejection, ReloadError, Reloader, ScanReport};
use crate::{
    kernel::Loaded,
    kernel::{Kernel, KernelError, SwapError, SwapReport},
    loader::{threads, LoadError, PluginFile},
    InstanceError,
};

/// Whose fault a failure to start or replace is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Blame {
    /// The file's (its code failed): rejected.
    File,
    /// `import_state` refused the saved state at a start: the file is rejected only if
    /// another file of the service accepts it.
    State,
    /// Something outside the file: tried again at the next rescan.
    Elsewhere,
}

/// The operation timeout a failure ran into, if it is a timeout.
fn timeout_of_kernel(error: &KernelError) -> Option<Duration> {
    let cause = match error {
        KernelError::StartFailed { cause, .. } => cause,
        KernelError::Swap(
            SwapError::RolledBack { cause, .. } | SwapError::RollbackFailed { cause, .. },
        ) => cause,
        _ => return None,
    };
    match cause {
        InstanceError::Timeout { timeout, .. } => Some(*timeout),
        _ => None,
    }
}

fn timeout_of(error: &ReloadError) -> Option<Duration> {
    match error {
        ReloadError::Kernel(error) => timeout_of_kernel(error),
        ReloadError::Load(LoadError::ProbeTimedOut { timeout, .. }) => Some(*timeout),
        _ => None,
    }
}

fn blame_reload(error: &ReloadError, replacing_live_state: bool) -> Blame {
    match error {
        ReloadError::Kernel(error) => blame(error, replacing_live_state),
        ReloadError::Load(error) if error.is_the_files_fault() => Blame::File,
        _ => Blame::Elsewhere,
    }
}

fn blame(error: &KernelError, replacing_live_state: bool) -> Blame {
    match error {
        // A new version that could not be brought up for the host's own reasons (its
        // worker did not start, or was killed from outside) is not at fault.
        KernelError::Swap(
            SwapError::RolledBack {
                cause: InstanceError::Unavailable(_),
                ..
            }
            | SwapError::RollbackFailed {
                cause: InstanceError::Unavailable(_),
                ..
            },
        ) => Blame::Elsewhere,
        KernelError::Swap(SwapError::RolledBack { .. } | SwapError::RollbackFailed { .. }) => {
            Blame::File
        }
        KernelError::StartFailed { cause, .. } => match cause {
            InstanceError::Import(_) if replacing_live_state => Blame::File,
            InstanceError::Import(_) => Blame::State,
            InstanceError::Create(_) | InstanceError::Start(_) | InstanceError::Timeout { .. } => {
                Blame::File
            }
            InstanceError::Thread(_) | InstanceError::Unavailable(_) => Blame::Elsewhere,
        },
        KernelError::Load(error) if error.is_the_files_fault() => Blame::File,
        _ => Blame::Elsewhere,
    }
}

impl Reloader {
    /// Carries the plans out: replaces side by side, then registrations and starts in
    /// dependency order, with fallbacks.
    pub(super) fn apply(
        &self,
        kernel: &Kernel,
        mut loaded: BTreeMap<PathBuf, Loaded>,
        only: Option<&str>,
        report: &mut ScanReport,
    ) {
        let plans = self.plans(kernel, only, report);
        let mut to_start = Vec::new();
        let mut replaces = Vec::new();
        for plan in &plans {
            match plan.action {
                Action::Restart => to_start.push(plan.service.clone()),
                Action::Replace => match self.library(kernel, &plan.candidates[0], &mut loaded) {
                    Ok(library) => replaces.push((plan, library)),
                    Err(error) => self.failed(plan, &plan.candidates[0], error, report),
                },
                Action::Add => {
                    for candidate in &plan.candidates {
                        let registered = self
                            .library(kernel, candidate, &mut loaded)
                            .and_then(|library| Ok(kernel.register(library, plan.config.clone())?));
                        match registered {
                            Ok(()) => {
                                report.added.push(plan.service.clone());
                                to_start.push(plan.service.clone());
                                break;
                            }
                            Err(error) => self.failed(plan, candidate, error, report),
                        }
                    }
                }
            }
        }
        drop(loaded);

        // Side by side: a busy service holds back its own replace only.
        let outcomes: Vec<(&Plan, Result<SwapReport, KernelError>)> = std::thread::scope(|scope| {
            let running: Vec<_> = replaces
                .into_iter()
                .map(|(plan, library)| {
                    let config = plan.config.clone();
                    let handle = scope.spawn(move || {
                        threads::adopt_current_thread();
                        kernel.replace(library, config)
                    });
                    (plan, handle)
                })
                .collect();
            running
                .into_iter()
                .filter_map(|(plan, replace)| Some((plan, replace.join().ok()?)))
                .collect()
        });
        for (plan, outcome) in outcomes {
            let winner = &plan.candidates[0];
            match outcome {
                Ok(swap) => {
                    self.verdicts
                        .good(&plan.service, &winner.path, &winner.sha256, &swap.to);
                    report.replaced.push(swap);
                }
                Err(error) => self.failed(plan, winner, error.into(), report),
            }
        }

        self.start_in_order(kernel, &plans, to_start, report);
    }

    /// Starts the given services in dependency order; a service whose file fails falls back
    /// to its other files (last good first); services that waited for one that came up are
    /// started in another pass.
    fn start_in_order(
        &self,
        kernel: &Kernel,
        plans: &[Plan],
        mut to_start: Vec<String>,
        report: &mut ScanReport,
    ) {
        let plan_of = |service: &str| plans.iter().find(|p| p.service == service);
        let restarting: BTreeSet<String> = plans
            .iter()
            .filter(|p| matches!(p.action, Action::Restart))
            .map(|p| p.service.clone())
            .collect();
        let is_dependency = |e: &KernelError| {
            matches!(
                e,
                KernelError::Dependency(_) | KernelError::DependencyNotRunning { .. }
            )
        };
        while !to_start.is_empty() {
            let failures = kernel.start_new(&to_start);
            let mut progress = false;
            for service in &to_start {
                if failures.iter().any(|(s, _)| s == service) {
                    continue;
                }
                progress = true;
                self.record_running(kernel, service);
                if restarting.contains(service) {
                    report.restarted.push(service.clone());
                }
            }
            let mut waiting = Vec::new();
            for (service, error) in failures {
                let Some(plan) = plan_of(&service) else {
                    report.errors.push(error.into());
                    continue;
                };
                match blame(&error, false) {
                    Blame::Elsewhere if is_dependency(&error) => waiting.push((service, error)),
                    Blame::Elsewhere => report.errors.push(error.into()),
                    blamed => progress |= self.fall_back(kernel, plan, error, blamed, report),
                }
            }
            // Those that failed for a dependency may start now that others did.
            to_start = Vec::new();
            for (service, error) in waiting {
                if progress {
                    to_start.push(service);
                } else {
                    report.errors.push(error.into());
                }
            }
        }
    }

    /// The service's registered file failed to start (`error`, blamed on it or on its
    /// state): its other files are tried, last good first, then by version. Returns whether
    /// one runs.
    fn fall_back(
        &self,
        kernel: &Kernel,
        plan: &Plan,
        error: KernelError,
        blamed: Blame,
        report: &mut ScanReport,
    ) -> bool {
        let Some(info) = kernel.info(&plan.service) else {
            report.errors.push(error.into());
            return false;
        };
        let failed = plan
            .candidates
            .iter()
            .find(|c| hex::encode(c.sha256) == info.sha256)
            .cloned();
        let last_good = self.verdicts.last_good(&plan.service);
        let mut others: Vec<&Candidate> = plan
            .candidates
            .iter()
            .filter(|c| hex::encode(c.sha256) != info.sha256)
            .collect();
        // Stable: the last good file first, the others keep their order (best first).
        others
            .sort_by_key(|c| last_good.as_ref().map(|g| &g.sha256) != Some(&hex::encode(c.sha256)));
        let reason = plugin_api::error_chain(&error);
        let timeout = timeout_of_kernel(&error);
        for candidate in others {
            let outcome = self
                .library(kernel, candidate, &mut BTreeMap::new())
                .and_then(|library| Ok(kernel.replace(library, plan.config.clone())?));
            match outcome {
                Ok(swap) => {
                    let line = format!(
                        "{}: fell back to {} (version {}) because {} (version {}) failed: {reason}",
                        plan.service,
                        candidate.path.display(),
                        swap.to,
                        info.path.display(),
                        info.version
                    );
                    tracing::warn!(service = %plan.service, "{line}");
                    report.fell_back.push(line);
                    if let Some(failed) = &failed {
                        self.reject(plan, failed, reason.clone(), timeout);
                    }
                    self.record_running(kernel, &plan.service);
                    report.errors.push(error.into());
                    return true;
                }
                Err(error) => {
                    if blame_reload(&error, false) == Blame::File {
                        self.reject(
                            plan,
                            candidate,
                            plugin_api::error_chain(&error),
                            timeout_of(&error),
                        );
                    }
                    tracing::warn!(service = %plan.service, plugin = %candidate.path.display(), error = %plugin_api::error_chain(&error), "fallback failed too");
                }
            }
        }
        if blamed == Blame::File {
            if let Some(failed) = &failed {
                self.reject(plan, failed, reason, timeout);
            }
        }
        report.errors.push(error.into());
        false
    }

    /// Rejects `candidate` for the plan's service and configuration.
    fn reject(
        &self,
        plan: &Plan,
        candidate: &Candidate,
        reason: String,
        timeout: Option<Duration>,
    ) {
        self.verdicts.reject(
            &plan.service,
            Rejection::new(
                &candidate.path,
                &candidate.sha256,
                &candidate.version.to_string(),
                plan.config_sha.as_ref(),
                reason,
                timeout,
            ),
        );
    }

    /// A failure of `candidate`: rejected when it is the file's own, reported either way.
    /// In a replace, an import refused is the new file's (the state is the live one).
    fn failed(
        &self,
        plan: &Plan,
        candidate: &Candidate,
        error: ReloadError,
        report: &mut ScanReport,
    ) {
        if blame_reload(&error, matches!(plan.action, Action::Replace)) == Blame::File {
            self.reject(
                plan,
                candidate,
                plugin_api::error_chain(&error),
                timeout_of(&error),
            );
        }
        report.errors.push(error);
    }

    /// Remembers the file `service` runs now as its last good file.
    fn record_running(&self, kernel: &Kernel, service: &str) {
        if let Some(info) = kernel.info(service) {
            let mut sha = [0u8; 32];
            if hex::decode_to_slice(&info.sha256, &mut sha).is_ok() {
                self.verdicts.good(service, &info.path, &sha, &info.version);
            }
        }
    }

    /// The library of `candidate`: loaded by this rescan, or loaded again (a file known from
    /// an earlier rescan whose service must change now, a retry).
    fn library(
        &self,
        kernel: &Kernel,
        candidate: &Candidate,
        loaded: &mut BTreeMap<PathBuf, Loaded>,
    ) -> Result<Loaded, ReloadError> {
        if let Some(library) = loaded.remove(&candidate.path) {
            return Ok(library);
        }
        let file = PluginFile::read(&candidate.path)?;
        let (mode, owner) = file.mode_and_owner();
        self.trust.check_file(&candidate.path, mode, owner)?;
        if let Some(list) = self.trust.allow_list()? {
            list.permits(&candidate.path, &candidate.sha256)?;
        }
        if file.sha256() != &candidate.sha256 {
            return Err(ReloadError::Changed {
                path: candidate.path.clone(),
            });
        }
        // SAFETY: the file passed the trust checks above; whoever made this reloader vouches
        // for those (`Reloader::new`).
        Ok(unsafe { kernel.load_version(&file)? })
    }
}
