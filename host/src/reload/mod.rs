//! Rescanning the plugins directory: what changed, and what to do about it.
//!
//! Each `*.so` file is identified by the SHA-256 of its content. A file whose `stat` (device,
//! inode, size, modification and change times) is the one seen last time is not even read;
//! a file whose digest is known is not opened again. Only regular files of at most
//! [`crate::loader::MAX_PLUGIN_SIZE`] bytes are read, non-blocking.
//!
//! Then, service by service, what should run is decided from the directory alone, whatever
//! happened before: among the files that provide the service and are not rejected (see
//! [`Verdicts`]), the highest version wins, also when it is lower than the running one (a
//! downgrade: the older version is told which version exported the state, and may refuse
//! it). What runs is brought in line with the winner:
//! - a new service is registered and started once its dependencies run;
//! - a running or stopped service whose winner is another file is hot-replaced;
//! - a service that failed or waits for a dependency, and whose winner is its own file, is
//!   started again;
//! - two files with the same version of a service and different contents are an error that
//!   names both, and the service is left as it is.
//!
//! A failure that is the file's own (it does not load, crashes its probe, fails in `new`,
//! `start`, or refuses the state in a hot replace) rejects the file; at a start, the host
//! then falls back to the last good file or the next-highest version. A failure from
//! outside the file (the state directory, the shadow directory, a busy service, a missing
//! dependency) rejects nothing: the next rescan tries again.
//!
//! A removed file leaves its service running, with a warning, unless another file of the
//! service remains (which then wins).

mod apply;
mod verdicts;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fs,
    path::{Path, PathBuf},
};

use sha2::{Digest, Sha256};

pub use verdicts::{FileRef, Rejection, Verdicts, RECORD};

use crate::{
    kernel::{Kernel, KernelError, Loaded, Status, SwapReport},
    loader::{LoadError, PluginFile},
    state::StateStore,
    trust::{AllowList, Trust, TrustError},
};

/// What the reloader knows of a file it has seen.
#[derive(Debug, Clone)]
struct KnownFile {
    /// What `stat` said when it was read: the same again means the same content, unread.
    stamp: Option<Stamp>,
    sha256: [u8; 32],
    /// The service and version it provides, or why it does not load (a reason of the
    /// file's own).
    provides: Result<(String, semver::Version), String>,
}

/// Why a file or a service was left alone during a rescan.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The plugins directory could not be listed.
    #[error("plugins directory {path} could not be listed")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
    /// A file could not be loaded.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// A service's configuration file exists but cannot be read.
    #[error("configuration file {path} could not be read")]
    Config {
        /// The `.conf` file.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
    /// Two files provide the same version of a service with different contents.
    #[error("service `{service}` version {version} is provided by both {first} and {second}, with different contents; remove one")]
    SameVersion {
        /// The service.
        service: String,
        /// The version.
        version: String,
        /// One file.
        first: PathBuf,
        /// The other file.
        second: PathBuf,
    },
    /// A file rejected earlier, not chosen while its content and configuration are the same.
    #[error("service `{service}`: {path} (version {}) was rejected: {}; not chosen until its content or configuration changes (`ctl reload --retry` tries it again)", rejection.file.version, rejection.reason)]
    Rejected {
        /// The service.
        service: String,
        /// The file, under its current name.
        path: PathBuf,
        /// The record: why, and under which name it was rejected.
        rejection: Rejection,
    },
    /// A service the host runs, or has a state file of, that no plugin file in the
    /// directory provides any more: it cannot start after a restart.
    #[error("service `{service}` has no plugin file in {dir}{}", orphan_detail(*running, state.as_deref(), last.as_deref()))]
    NoPluginFile {
        /// The service.
        service: String,
        /// The plugins directory.
        dir: PathBuf,
        /// Whether it runs (from a library loaded before its file went).
        running: bool,
        /// Its state file, if it has one.
        state: Option<PathBuf>,
        /// The file it was last loaded from, if known.
        last: Option<PathBuf>,
    },
    /// `ctl reload SERVICE` named a service no file provides.
    #[error("no plugin file in {dir} provides a service `{service}`")]
    NoSuchService {
        /// The name asked for.
        service: String,
        /// The plugins directory.
        dir: PathBuf,
    },
    /// A service that is not running has no file it can run.
    #[error("service `{service}` is not running: every one of its plugin files is rejected{}", match last_good { Some(good) => format!(", and its last good file {} (version {}, sha256 {}) is not in the plugins directory any more", good.file.display(), good.version, good.sha256.get(..12).unwrap_or(&good.sha256)), None => String::new() })]
    NothingToRun {
        /// The service.
        service: String,
        /// Its last good file, when it is gone.
        last_good: Option<FileRef>,
    },
    /// A file that failed to load for a reason of its own, earlier: not read again until it
    /// changes.
    #[error("plugin {path} failed to load earlier and is unchanged: {reason}")]
    Broken {
        /// The file.
        path: PathBuf,
        /// Why it failed.
        reason: String,
    },
    /// A file changed between two reads of one rescan: the next rescan takes it.
    #[error("plugin {path} changed while it was read; the next rescan takes it")]
    Changed {
        /// The file.
        path: PathBuf,
    },
    /// The plugins directory or a plugin file is not trusted (see [`crate::trust`]).
    #[error(transparent)]
    Untrusted(#[from] TrustError),
    /// The kernel refused the change (a replace rolled back, a start failed...).
    #[error(transparent)]
    Kernel(#[from] KernelError),
}

/// What one rescan did.
#[derive(Debug, Default)]
pub struct ScanReport {
    /// Services registered (and started, unless listed in `errors`).
    pub added: Vec<String>,
    /// Hot replaces that happened.
    pub replaced: Vec<SwapReport>,
    /// Services started again (they had failed, or waited for a dependency).
    pub restarted: Vec<String>,
    /// Fallbacks: a service started from another file than its winner, which failed (one
    /// line each).
    pub fell_back: Vec<String>,
    /// Files skipped because their content was already known.
    pub unchanged: usize,
    /// What went wrong, or stays wrong (rejected files), file by file or service by service.
    /// Nothing listed here changed a running service.
    pub errors: Vec<ReloadError>,
}

/// Watches one plugins directory on behalf of a kernel. Owned by the daemon's reload thread.
#[derive(Debug)]
pub struct Reloader {
    dir: PathBuf,
    known: HashMap<PathBuf, KnownFile>,
    trust: Trust,
    verdicts: Verdicts,
    /// Whether the record was read from the state directory (once, at the first scan).
    record_read: bool,
}

/// One candidate file of a service.
#[derive(Debug, Clone)]
struct Candidate {
    path: PathBuf,
    sha256: [u8; 32],
    version: semver::Version,
}

/// What a rescan does to one service.
#[derive(Debug)]
enum Action {
    /// Register the first candidate that loads, and start it.
    Add,
    /// Hot-replace (or swap, when not running) with the winner.
    Replace,
    /// Start the registered file again.
    Restart,
}

/// One service's plan: its candidates, best first, and its configuration.
#[derive(Debug)]
struct Plan {
    service: String,
    action: Action,
    candidates: Vec<Candidate>,
    config: Option<String>,
    config_sha: Option<[u8; 32]>,
}

impl Reloader {
    /// A reloader for `dir` that has seen nothing yet: its first scan loads everything.
    ///
    /// # Safety
    ///
    /// Its scans load the plugin files of `dir` that pass its [`Trust`] checks (see
    /// [`crate::loader::Loader::load`]): the caller vouches for every file those checks
    /// let through, as the operator who names the plugins directory does.
    pub unsafe fn new(dir: &Path) -> Self {
        Reloader {
            dir: dir.to_owned(),
            known: HashMap::new(),
            trust: Trust::default(),
            verdicts: Verdicts::default(),
            record_read: false,
        }
    }

    /// Uses `trust` (strict modes are on by default, with no allow list).
    pub fn with_trust(mut self, trust: Trust) -> Self {
        self.trust = trust;
        self
    }

    /// The verdicts this reloader makes (to show them elsewhere).
    pub fn verdicts(&self) -> Verdicts {
        self.verdicts.clone()
    }

    /// The configuration text of a service: `<plugins-dir>/<service>.conf`, if present.
    pub fn config_of(&self, service: &str) -> Result<Option<String>, ReloadError> {
        let path = self.dir.join(format!("{service}.conf"));
        if path.exists() {
            self.trust.check("configuration file", &path)?;
        }
        match crate::bounded::read_to_string(&path, crate::bounded::MAX_CONFIG_SIZE) {
            Ok(text) => Ok(Some(text)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(ReloadError::Config { path, source }),
        }
    }

    /// Rescans the directory and applies what changed; `only` limits the changes to one
    /// service.
    pub fn scan(&mut self, kernel: &Kernel, only: Option<&str>) -> ScanReport {
        self.scan_with(kernel, only, false)
    }

    /// Like [`Reloader::scan`]; with `retry`, the files rejected earlier (for `only`, or all)
    /// are forgotten and tried again.
    pub fn scan_with(&mut self, kernel: &Kernel, only: Option<&str>, retry: bool) -> ScanReport {
        let _span = tracing::info_span!("rescan", dir = %self.dir.display()).entered();
        if !self.record_read {
            self.record_read = true;
            if let Some(store) = kernel.state_store() {
                self.verdicts.load(store);
            }
        }
        if retry {
            self.verdicts.clear(only);
            if only.is_none() {
                self.known.retain(|_, k| k.provides.is_ok());
            }
        }
        let mut report = ScanReport::default();
        // What is trusted comes first: nothing new is loaded from a directory another user
        // can write, or with an allow list that cannot be read.
        let allowed = self
            .trust
            .check("plugins directory", &self.dir)
            .and_then(|()| self.trust.allow_list());
        match (allowed, plugin_files(&self.dir)) {
            (Err(error), _) => report.errors.push(error.into()),
            (Ok(allowed), Ok(files)) => {
                self.forget_removed(kernel, &files);
                let loaded = self.load_changed(kernel, files, only, allowed.as_ref(), &mut report);
                if let Some(only) = only {
                    let provided = self.known.values().any(|k| {
                        k.provides
                            .as_ref()
                            .is_ok_and(|(service, _)| service == only)
                    });
                    if !provided && kernel.info(only).is_none() {
                        report.errors.push(ReloadError::NoSuchService {
                            service: only.to_owned(),
                            dir: self.dir.clone(),
                        });
                    }
                }
                self.apply(kernel, loaded, only, &mut report);
                self.report_orphans(kernel, only, &mut report);
            }
            (Ok(_), Err(source)) => {
                let error = ReloadError::Dir {
                    path: self.dir.clone(),
                    source,
                };
                report.errors.push(error);
            }
        }
        self.verdicts.set_present(
            self.known
                .iter()
                .map(|(path, known)| (path.clone(), known.sha256)),
        );
        self.verdicts.set_broken(
            self.known
                .iter()
                .filter_map(|(path, k)| Some((path.clone(), k.provides.clone().err()?)))
                .collect(),
        );
        self.verdicts.persist(kernel.state_store());
        for error in &report.errors {
            tracing::error!(error = %plugin_api::error_chain(error), "rescan: not applied");
        }
        tracing::info!(
            added = report.added.len(),
            replaced = report.replaced.len(),
            restarted = report.restarted.len(),
            unchanged = report.unchanged,
            errors = report.errors.len(),
            "rescan done"
        );
        report
    }

    /// Reports every service (or `only` that one) that runs, or has a state file, and that
    /// no plugin file of the directory provides: at every rescan, start-up's included.
    fn report_orphans(&self, kernel: &Kernel, only: Option<&str>, report: &mut ScanReport) {
        let provided: BTreeSet<&str> = self
            .known
            .values()
            .filter_map(|k| {
                k.provides
                    .as_ref()
                    .ok()
                    .map(|(service, _)| service.as_str())
            })
            .collect();
        // Registered: where it was loaded from, and whether it runs.
        let mut services: BTreeMap<String, Option<(PathBuf, bool)>> = kernel
            .list()
            .into_iter()
            .map(|info| (info.name, Some((info.path, info.status == Status::Running))))
            .collect();
        let store = kernel.state_store();
        for service in store
            .map(StateStore::services_with_state)
            .unwrap_or_default()
        {
            services.entry(service).or_insert(None);
        }
        let mut orphans = Vec::new();
        for (service, loaded_from) in services {
            if provided.contains(service.as_str()) || only.is_some_and(|only| only != service) {
                continue;
            }
            let running = loaded_from.as_ref().is_some_and(|(_, running)| *running);
            let last = match loaded_from {
                Some((path, _)) => Some(path),
                None => self.verdicts.last_good(&service).map(|g| g.file),
            };
            let state = store
                .map(|store| store.path(&service))
                .filter(|path| path.exists());
            let error = ReloadError::NoPluginFile {
                service: service.clone(),
                dir: self.dir.clone(),
                running,
                state,
                last,
            };
            orphans.push((service, error.to_string()));
            report.errors.push(error);
        }
        if only.is_none() {
            self.verdicts.set_orphans(orphans);
        }
    }

    /// Forgets the files that are gone; their services keep running.
    fn forget_removed(&mut self, kernel: &Kernel, files: &[PathBuf]) {
        let present: BTreeSet<&PathBuf> = files.iter().collect();
        let removed: Vec<PathBuf> = self
            .known
            .keys()
            .filter(|p| !present.contains(p))
            .cloned()
            .collect();
        for path in removed {
            let Some(KnownFile {
                provides: Ok((service, _)),
                ..
            }) = self.known.remove(&path)
            else {
                continue;
            };
            if kernel.info(&service).is_some_and(|info| info.path == path) {
                tracing::warn!(service, plugin = %path.display(), "plugin file removed; the service keeps running unless another of its files remains");
            }
        }
    }

    /// Loads the files whose content is new; files already known are not even opened. A
    /// file that fails for a reason outside itself is not remembered: it is read again at
    /// the next rescan.
    fn load_changed(
        &mut self,
        kernel: &Kernel,
        files: Vec<PathBuf>,
        only: Option<&str>,
        allowed: Option<&AllowList>,
        report: &mut ScanReport,
    ) -> BTreeMap<PathBuf, Loaded> {
        let mut loaded = BTreeMap::new();
        let mut fresh = BTreeSet::new();
        for path in files {
            let stamp = Stamp::of(&path);
            if stamp.is_some() && self.known.get(&path).is_some_and(|k| k.stamp == stamp) {
                report.unchanged += 1;
                continue;
            }
            let file = match PluginFile::read(&path) {
                Ok(file) => file,
                Err(error) => {
                    self.known.remove(&path);
                    report.errors.push(error.into());
                    continue;
                }
            };
            let sha256 = *file.sha256();
            // Not remembered: a file made safe (chmod, or listed) is taken at the next rescan.
            let (mode, owner) = file.mode_and_owner();
            let trusted = self
                .trust
                .check_file(&path, mode, owner)
                .and_then(|()| allowed.map_or(Ok(()), |list| list.permits(&path, &sha256)));
            if let Err(error) = trusted {
                self.known.remove(&path);
                report.errors.push(error.into());
                continue;
            }
            if let Some(known) = self.known.get_mut(&path).filter(|k| k.sha256 == sha256) {
                known.stamp = stamp;
                report.unchanged += 1;
                continue;
            }
            // SAFETY: the file passed the trust checks above; whoever made this reloader
            // vouches for those (`Reloader::new`).
            match unsafe { kernel.load_version(&file) } {
                Ok(library) => {
                    let manifest = library.manifest();
                    if only.is_some_and(|only| manifest.name != only) {
                        // Not recorded as known: a later full rescan applies it.
                        continue;
                    }
                    let provides = Ok((manifest.name.clone(), manifest.version.clone()));
                    self.known.insert(
                        path.clone(),
                        KnownFile {
                            stamp,
                            sha256,
                            provides,
                        },
                    );
                    loaded.insert(path, library);
                }
                Err(error) => {
                    if let LoadError::AbiMismatch { report, .. } = &error {
                        tracing::debug!(plugin = %path.display(), %report, "abi_stable's layout report");
                    }
                    if error.is_the_files_fault() {
                        // Reported at every rescan, read again only when it changes.
                        self.known.insert(
                            path.clone(),
                            KnownFile {
                                stamp,
                                sha256,
                                provides: Err(plugin_api::error_chain(&error)),
                            },
                        );
                        fresh.insert(path);
                    } else {
                        self.known.remove(&path);
                    }
                    report.errors.push(error.into());
                }
            }
        }
        for (path, known) in &self.known {
            if fresh.contains(path) {
                continue;
            }
            if let Err(reason) = &known.provides {
                report.errors.push(ReloadError::Broken {
                    path: path.clone(),
                    reason: reason.clone(),
                });
            }
        }
        loaded
    }

    /// Decides, service by service, what should run (see the module documentation).
    fn plans(&self, kernel: &Kernel, only: Option<&str>, report: &mut ScanReport) -> Vec<Plan> {
        let mut by_service: BTreeMap<&str, Vec<Candidate>> = BTreeMap::new();
        for (path, known) in &self.known {
            if let Ok((service, version)) = &known.provides {
                by_service.entry(service).or_default().push(Candidate {
                    path: path.clone(),
                    sha256: known.sha256,
                    version: version.clone(),
                });
            }
        }
        let mut plans = Vec::new();
        for (service, candidates) in by_service {
            if only.is_some_and(|only| only != service) {
                continue;
            }
            let config = match self.config_of(service) {
                Ok(config) => config,
                Err(error) => {
                    report.errors.push(error);
                    continue;
                }
            };
            let config_sha: Option<[u8; 32]> =
                config.as_ref().map(|c| Sha256::digest(c.as_bytes()).into());
            let mut chosen = Vec::new();
            for candidate in candidates {
                let rejection = self.verdicts.rejection(
                    service,
                    &candidate.sha256,
                    config_sha.as_ref(),
                    kernel.operation_timeout(),
                );
                match rejection {
                    Some(rejection) => report.errors.push(ReloadError::Rejected {
                        service: service.to_owned(),
                        path: candidate.path.clone(),
                        rejection,
                    }),
                    None => chosen.push(candidate),
                }
            }
            let last_good = self.verdicts.last_good(service);
            // A service whose mode or isolation settings are to change is replaced by its
            // own file, loaded again with them: what runs counts as another file.
            let running = kernel.info(service).map(|info| {
                let status = match &info.process {
                    // Crashed too often: left failed until a start or another version (a
                    // rescan is neither).
                    Some(process) if process.gave_up => Status::Running,
                    _ => info.status,
                };
                if kernel.isolation_of(service) == kernel.isolation_in_effect(service) {
                    (info.sha256, status)
                } else {
                    (String::new(), status)
                }
            });
            let present = |good: &FileRef| {
                self.known
                    .values()
                    .any(|k| hex::encode(k.sha256) == good.sha256)
            };
            let decision = decide(service, chosen, last_good, running.as_ref(), &present);
            if let Some(error) = decision.error {
                report.errors.push(error);
            }
            if let Some((action, candidates)) = decision.plan {
                plans.push(Plan {
                    service: service.to_owned(),
                    action,
                    candidates,
                    config,
                    config_sha,
                });
            }
        }
        plans
    }
}

/// What a rescan does for one service, decided by [`decide`].
#[derive(Debug)]
struct Decision {
    /// What to tell the operator.
    error: Option<ReloadError>,
    /// What to do, with the candidates best first.
    plan: Option<(Action, Vec<Candidate>)>,
}

/// Which file of `service` should run, and what to do to get there: a pure decision, from
/// the files that provide the service and are not rejected (`chosen`), its last good file,
/// what runs now (`running`: the SHA-256 in hex and the status), and whether a file is
/// still in the directory (`present`). The highest version wins; two different files of that
/// version are ambiguous (what runs keeps running; a service that does not run starts from
/// its last good file if it is one of them); a running winner is left alone.
fn decide(
    service: &str,
    mut chosen: Vec<Candidate>,
    last_good: Option<FileRef>,
    running: Option<&(String, Status)>,
    present: &dyn Fn(&FileRef) -> bool,
) -> Decision {
    chosen.sort_by(|a, b| b.version.cmp(&a.version).then(a.path.cmp(&b.path)));
    let nothing = Decision {
        error: None,
        plan: None,
    };
    let Some(winner) = chosen.first() else {
        if running.is_some() {
            return nothing;
        }
        return Decision {
            error: Some(ReloadError::NothingToRun {
                service: service.to_owned(),
                last_good: last_good.filter(|good| !present(good)),
            }),
            plan: None,
        };
    };
    if let Some(twin) = chosen[1..]
        .iter()
        .find(|c| c.version == winner.version && c.sha256 != winner.sha256)
    {
        let error = Some(ReloadError::SameVersion {
            service: service.to_owned(),
            version: winner.version.to_string(),
            first: winner.path.clone(),
            second: twin.path.clone(),
        });
        // Ambiguous: what runs keeps running. A service that does not run yet (a restart)
        // starts from its last good file if it is one of the two.
        let is_good = |c: &Candidate| {
            last_good
                .as_ref()
                .is_some_and(|g| g.sha256 == hex::encode(c.sha256))
        };
        let mut plan = None;
        if running.is_none() {
            if let Some(good) = chosen.iter().find(|c| is_good(c)).cloned() {
                chosen.retain(|c| c.version < good.version);
                chosen.insert(0, good);
                plan = Some((Action::Add, chosen));
            }
        }
        return Decision { error, plan };
    }
    let action = match running {
        None => Action::Add,
        Some((sha256, _)) if *sha256 != hex::encode(winner.sha256) => Action::Replace,
        Some((_, Status::Failed | Status::Registered)) => Action::Restart,
        Some(_) => return nothing,
    };
    Decision {
        error: None,
        plan: Some((action, chosen)),
    }
}

/// What `stat` says of a file that changes whenever its content does (short of a deliberate
/// forgery): device, inode, size, and modification and change times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    fn of(path: &Path) -> Option<Stamp> {
        use std::os::unix::fs::MetadataExt;
        let m = fs::metadata(path).ok()?;
        Some(Stamp {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        })
    }
}

/// The rest of [`ReloadError::NoPluginFile`]'s message.
fn orphan_detail(running: bool, state: Option<&Path>, last: Option<&Path>) -> String {
    let mut text = match last {
        Some(last) => format!(" any more (it was {})", last.display()),
        None => String::new(),
    };
    text.push_str(if running {
        ": it keeps running the version loaded, but will not start again after a restart"
    } else {
        ": it does not run"
    });
    if let Some(state) = state {
        text.push_str(&format!("; its state file {} is kept", state.display()));
    }
    text.push_str("; put a plugin file of it back in the directory");
    text
}

/// The `*.so` entries of `dir`, sorted: whatever they are (a dangling link, a directory, a
/// device), so that reading one that is not a plugin file reports it instead of passing
/// over it in silence.
fn plugin_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "so") {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

#[cfg(test)]
mod tests;
