//! Rescanning the plugins directory: what changed, and what to do about it.
//!
//! Each `*.so` file is identified by the SHA-256 of its content. A file whose `stat` (device,
//! inode, size, modification and change times) is the one seen last time is not even read;
//! a file whose digest is known is skipped without being opened. Only regular files of at
//! most [`crate::loader::MAX_PLUGIN_SIZE`] bytes are read, non-blocking. Changed and new files are loaded; then, service by
//! service, the highest version among the directory's files wins:
//! - a new service is registered and started (dependencies first);
//! - a running service whose winner is a file just loaded is hot-replaced;
//! - two files with the same version of a service and different contents are an error that
//!   names both, and the service is left as it is.
//!
//! A removed file leaves its service running, with a warning.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fs,
    path::{Path, PathBuf},
};

use crate::{
    kernel::{Kernel, KernelError, SwapReport},
    loader::{threads, Library, LoadError, PluginFile},
};

/// What the reloader knows of a file it has seen.
#[derive(Debug, Clone)]
struct KnownFile {
    /// What `stat` said when it was read: the same again means the same content, unread.
    stamp: Option<Stamp>,
    sha256: [u8; 32],
    /// Service and version it provides; `None` when it failed to load.
    provides: Option<(String, semver::Version)>,
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
    /// Files skipped because their content was already known.
    pub unchanged: usize,
    /// What went wrong, file by file or service by service. Nothing listed here changed a
    /// running service.
    pub errors: Vec<ReloadError>,
}

/// Watches one plugins directory on behalf of a kernel. Owned by the daemon's main loop.
#[derive(Debug)]
pub struct Reloader {
    dir: PathBuf,
    known: HashMap<PathBuf, KnownFile>,
}

impl Reloader {
    /// A reloader for `dir` that has seen nothing yet: its first scan loads everything.
    pub fn new(dir: &Path) -> Self {
        Reloader {
            dir: dir.to_owned(),
            known: HashMap::new(),
        }
    }

    /// The configuration text of a service: `<plugins-dir>/<service>.conf`, if present.
    pub fn config_of(&self, service: &str) -> Result<Option<String>, ReloadError> {
        let path = self.dir.join(format!("{service}.conf"));
        match fs::read_to_string(&path) {
            Ok(text) => Ok(Some(text)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(ReloadError::Config { path, source }),
        }
    }

    /// Rescans the directory and applies what changed; `only` limits the changes to one
    /// service.
    pub fn scan(&mut self, kernel: &Kernel, only: Option<&str>) -> ScanReport {
        let _span = tracing::info_span!("rescan", dir = %self.dir.display()).entered();
        let mut report = ScanReport::default();
        match plugin_files(&self.dir) {
            Ok(files) => {
                self.forget_removed(kernel, &files);
                let loaded = self.load_changed(kernel, files, only, &mut report);
                self.apply(kernel, loaded, &mut report);
            }
            Err(source) => {
                let error = ReloadError::Dir {
                    path: self.dir.clone(),
                    source,
                };
                tracing::error!(error = %crate::error_chain(&error), "rescan failed");
                report.errors.push(error);
            }
        }
        tracing::info!(
            added = report.added.len(),
            replaced = report.replaced.len(),
            unchanged = report.unchanged,
            errors = report.errors.len(),
            "rescan done"
        );
        report
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
                provides: Some((service, _)),
                ..
            }) = self.known.remove(&path)
            else {
                continue;
            };
            if kernel.info(&service).is_some_and(|info| info.path == path) {
                tracing::warn!(service, plugin = %path.display(), "plugin file removed; the service keeps running");
            }
        }
    }

    /// Loads the files whose content is new; files already known are not even opened.
    fn load_changed(
        &mut self,
        kernel: &Kernel,
        files: Vec<PathBuf>,
        only: Option<&str>,
        report: &mut ScanReport,
    ) -> BTreeMap<PathBuf, Library> {
        let mut loaded = BTreeMap::new();
        for path in files {
            let stamp = Stamp::of(&path);
            if stamp.is_some() && self.known.get(&path).is_some_and(|k| k.stamp == stamp) {
                report.unchanged += 1;
                continue;
            }
            let file = match PluginFile::read(&path) {
                Ok(file) => file,
                Err(error) => {
                    report.errors.push(error.into());
                    continue;
                }
            };
            let sha256 = *file.sha256();
            if let Some(known) = self.known.get_mut(&path).filter(|k| k.sha256 == sha256) {
                known.stamp = stamp;
                report.unchanged += 1;
                continue;
            }
            match kernel.loader().load_file(&file) {
                Ok(library) => {
                    let manifest = library.manifest();
                    if only.is_some_and(|only| manifest.name != only) {
                        // Not recorded as known: a later full rescan applies it.
                        continue;
                    }
                    let provides = Some((manifest.name.clone(), manifest.version.clone()));
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
                    let provides = None;
                    self.known.insert(
                        path,
                        KnownFile {
                            stamp,
                            sha256,
                            provides,
                        },
                    );
                    report.errors.push(error.into());
                }
            }
        }
        loaded
    }

    /// Per service, the highest version among all its files wins; a winner just loaded is
    /// registered (new service) or hot-replaces the running version. The libraries that
    /// lose are closed.
    fn apply(
        &self,
        kernel: &Kernel,
        mut loaded: BTreeMap<PathBuf, Library>,
        report: &mut ScanReport,
    ) {
        let mut by_service: BTreeMap<&str, Vec<(&PathBuf, &KnownFile)>> = BTreeMap::new();
        for (path, known) in &self.known {
            if let Some((service, _)) = &known.provides {
                by_service.entry(service).or_default().push((path, known));
            }
        }
        let mut added = Vec::new();
        let mut replaces = Vec::new();
        for (service, mut candidates) in by_service {
            candidates.sort_by(|a, b| version_of(b.1).cmp(version_of(a.1)).then(a.0.cmp(b.0)));
            let (winner, best) = candidates[0];
            let twin = candidates[1..]
                .iter()
                .find(|(_, k)| version_of(k) == version_of(best) && k.sha256 != best.sha256);
            if let Some((other, _)) = twin {
                // Reported when one of them is new; left alone either way.
                if candidates
                    .iter()
                    .any(|(path, _)| loaded.contains_key(*path))
                {
                    report.errors.push(ReloadError::SameVersion {
                        service: service.to_owned(),
                        version: version_of(best).to_string(),
                        first: winner.clone(),
                        second: (*other).clone(),
                    });
                }
                continue;
            }
            let Some(library) = loaded.remove(winner) else {
                continue;
            };
            let running = kernel.info(service);
            if running
                .as_ref()
                .is_some_and(|info| info.sha256 == hex::encode(library.sha256()))
            {
                // The very library that is loaded already (seen by an earlier reloader).
                continue;
            }
            let config = match self.config_of(service) {
                Ok(config) => config,
                Err(error) => {
                    report.errors.push(error);
                    continue;
                }
            };
            if running.is_none() {
                match kernel.register(library, config) {
                    Ok(()) => added.push(service.to_owned()),
                    Err(error) => report.errors.push(error.into()),
                }
            } else {
                replaces.push((library, config));
            }
        }
        drop(loaded);

        // Side by side: a busy service holds back its own replace only.
        let outcomes: Vec<Result<SwapReport, KernelError>> = std::thread::scope(|scope| {
            let running: Vec<_> = replaces
                .into_iter()
                .map(|(library, config)| {
                    scope.spawn(move || {
                        threads::adopt_current_thread();
                        kernel.replace(library, config)
                    })
                })
                .collect();
            running
                .into_iter()
                .filter_map(|replace| replace.join().ok())
                .collect()
        });
        for outcome in outcomes {
            match outcome {
                Ok(swap) => report.replaced.push(swap),
                Err(error) => report.errors.push(error.into()),
            }
        }

        // Everything else is logged here, once; `start_new` logs its own failures.
        for error in &report.errors {
            tracing::error!(error = %crate::error_chain(error), "rescan: not applied; what ran keeps running");
        }
        for (service, error) in kernel.start_new(&added) {
            report.errors.push(ReloadError::Kernel(error));
            added.retain(|s| *s != service);
        }
        report.added = added;
    }
}

fn version_of(known: &KnownFile) -> &semver::Version {
    &known
        .provides
        .as_ref()
        .expect("only files that provide a service")
        .1
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

/// The `*.so` files of `dir`, sorted.
fn plugin_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "so") && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}
