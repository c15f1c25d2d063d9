//! [`Library`]: one opened plugin file (or a linked service), its thread attribution, its
//! close with a deadline, and the state of the dynamic loader.

use std::{
    fs,
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::Duration,
};

use libloading::os::unix::Library as RawLibrary;
use plugin_api::abi::PluginModRef;

use super::{
    error::libloading_reason,
    threads::{self, Census, ThreadInfo},
    Manifest,
};

/// One opened plugin file: its manifest and its root module.
///
/// Shared as `Arc<Library>` by the kernel (which keeps the service's current library) and by
/// every [`super::Instance`] created from it. Closed by [`Library::close`], or on drop.
pub struct Library {
    pub(super) path: PathBuf,
    pub(super) shadow: PathBuf,
    pub(super) sha256: [u8; 32],
    pub(super) manifest: Manifest,
    /// Points into `raw`; never handed out. `None` only while loading.
    pub(super) module: Option<PluginModRef>,
    /// `None` once closed.
    pub(super) raw: Option<RawLibrary>,
    /// The threads alive before the library was opened.
    pub(super) baseline: Census,
    /// Names the library when threads are attributed to it (see `threads`).
    pub(super) id: threads::LibraryId,
    /// How long `dlclose` may take.
    pub(super) close_timeout: Duration,
}

/// How long closing a library may take unless the loader says otherwise.
pub(super) const DEFAULT_CLOSE_TIMEOUT: Duration = Duration::from_secs(30);

/// The next [`Library`]'s id.
pub(super) static NEXT_LIBRARY_ID: AtomicU64 = AtomicU64::new(1);

/// Set once a `dlclose` did not return in time: a library destructor hangs while holding the
/// dynamic loader's lock, so nothing can be opened any more (it would wait for ever).
pub(super) static LOADER_WEDGED: AtomicBool = AtomicBool::new(false);

/// How many `dlclose` calls are under way: while one is, the dynamic loader's lock is held,
/// maybe for good.
pub(super) static CLOSING: AtomicU64 = AtomicU64::new(0);

impl std::fmt::Debug for Library {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Library")
            .field("path", &self.path)
            .field("service", &self.manifest.name)
            .field("version", &self.manifest.version.to_string())
            .finish_non_exhaustive()
    }
}

impl Library {
    /// A service linked into this program, behind the same interface as a plugin file: its
    /// instances are made and driven through the very glue `export_service!` gives a plugin
    /// (the same `extern "C"` functions, the same copies across the boundary), with no file,
    /// no `dlopen`, no census and nothing to unmap. For kernel tests that need no real
    /// library, and for programs that embed the kernel with services of their own. Its path
    /// is `linked:NAME`. The error is the manifest's (a service name the host refuses).
    pub fn linked<S: plugin_api::Service>() -> Result<Library, String> {
        use abi_stable::prefix_type::PrefixTypeTrait as _;
        use plugin_api::{abi::PluginMod, export_parts};
        // Leaked: a linked service's module lives as long as the program, as a library's
        // static one lives as long as the library (a few bytes per call).
        let module: PluginModRef = PluginMod {
            manifest: export_parts::manifest::<S>,
            new_service: export_parts::new_service::<S>,
        }
        .leak_into_prefix();
        let manifest = Manifest::from_raw(&(module.manifest())())?;
        Ok(Library {
            path: PathBuf::from(format!("linked:{}", manifest.name)),
            shadow: PathBuf::new(),
            sha256: [0; 32],
            manifest,
            module: Some(module),
            raw: None,
            baseline: Census::default(),
            id: NEXT_LIBRARY_ID.fetch_add(1, Ordering::Relaxed),
            close_timeout: DEFAULT_CLOSE_TIMEOUT,
        })
    }

    /// Whether this is a service linked into the program ([`Library::linked`]), not a file.
    pub fn is_linked(&self) -> bool {
        self.raw.is_none()
    }

    /// The plugin file this library was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The SHA-256 of the file's content, as loaded.
    pub fn sha256(&self) -> &[u8; 32] {
        &self.sha256
    }

    /// The validated manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The private path the library was opened from (already unlinked). `/proc/self/maps`
    /// names the mapping after it.
    pub fn shadow_path(&self) -> &Path {
        &self.shadow
    }

    /// Calls the root module's constructor. The module itself is never handed out: it
    /// points into the library, and no reference into a library may outlive it.
    pub(super) fn new_raw_service(
        &self,
        host: plugin_api::abi::HostHandle,
        config: abi_stable::std_types::ROption<abi_stable::std_types::RString>,
    ) -> Result<plugin_api::abi::RawService, String> {
        let module = self.module.expect("a loaded library has a root module");
        (module.new_service())(host, config)
            .into_result()
            .map_err(abi_stable::std_types::RString::into_string)
    }

    /// The threads that may run this library's code although the host did not start them:
    /// alive now, not alive when it was opened, not the host's, and not attributed by
    /// `elsewhere` (given a thread's name) to something else.
    pub fn newcomers(&self, elsewhere: &dyn Fn(&str) -> bool) -> std::io::Result<Vec<ThreadInfo>> {
        threads::newcomers(&self.baseline, (&self.manifest.name, self.id), elsewhere)
    }

    /// Names the library when threads are attributed to it: its service and its id.
    pub(super) fn attribution(&self) -> (&str, threads::LibraryId) {
        (&self.manifest.name, self.id)
    }

    /// Closes the library, unless a thread that may run its code is alive
    /// ([`Library::newcomers`]): then the library comes back with those threads, still
    /// loaded. Closed, it returns whether the library is really gone from the address space
    /// (`false`, with a warning naming the plugin, when something such as a thread-local
    /// destructor still pins it).
    ///
    /// Call it once every instance of the library has been dropped and its executor thread
    /// has ended.
    pub fn close(
        mut self,
        elsewhere: &dyn Fn(&str) -> bool,
    ) -> Result<bool, (Library, Vec<ThreadInfo>)> {
        if self.is_linked() {
            return Ok(true);
        }
        match self.newcomers(elsewhere) {
            Ok(threads) if threads.is_empty() => Ok(self.close_inner()),
            Ok(threads) => Err((self, threads)),
            Err(error) => {
                // Without a census, nothing proves the library unused.
                let unknown = ThreadInfo::unknown(&error);
                Err((self, vec![unknown]))
            }
        }
    }

    fn close_inner(&mut self) -> bool {
        let Some(raw) = self.raw.take() else {
            return true;
        };
        // Dropped before the code it points into is unmapped.
        self.module = None;
        // `dlclose` runs the library's destructors (C `destructor`s, `.fini_array`): plugin
        // code, waited for with a deadline on a thread of its own.
        // Waited for with a mutex and a condition variable: while `dlclose` holds the dynamic
        // loader's lock, a thread's first use of a thread-local with a destructor (as a
        // channel's is) would wait for that lock too.
        type Done = (
            std::sync::Mutex<Option<Result<(), String>>>,
            std::sync::Condvar,
        );
        let done: std::sync::Arc<Done> = Default::default();
        let closer = done.clone();
        CLOSING.fetch_add(1, Ordering::AcqRel);
        let closing = threads::spawn_detached("dlclose", move || {
            let outcome = raw.close().map_err(|e| libloading_reason(&e));
            CLOSING.fetch_sub(1, Ordering::AcqRel);
            *closer.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(outcome);
            closer.1.notify_all();
        });
        if let Err(error) = closing {
            CLOSING.fetch_sub(1, Ordering::AcqRel);
            tracing::warn!(plugin = %self.path.display(), %error, "no thread to close the library with; it stays loaded");
            return false;
        }
        let outcome = {
            let guard = done.0.lock().unwrap_or_else(|p| p.into_inner());
            let (mut guard, _) = done
                .1
                .wait_timeout_while(guard, self.close_timeout, |outcome| outcome.is_none())
                .unwrap_or_else(|p| p.into_inner());
            guard.take()
        };
        match outcome {
            Some(Ok(())) => {}
            Some(Err(reason)) => {
                tracing::warn!(plugin = %self.path.display(), error = %reason, "dlclose failed");
            }
            None => {
                LOADER_WEDGED.store(true, Ordering::Release);
                tracing::error!(
                    plugin = %self.path.display(),
                    service = %self.manifest.name,
                    timeout = ?self.close_timeout,
                    "closing the library did not finish: its destructors hang, holding the dynamic loader's lock; no plugin can be loaded until the host restarts"
                );
                return false;
            }
        }
        match is_mapped(&self.shadow) {
            Ok(false) => true,
            Ok(true) => {
                tracing::warn!(
                    plugin = %self.path.display(),
                    service = %self.manifest.name,
                    "library still mapped after close (a leak, not a crash): a thread-local destructor or a thread started by the plugin pins it"
                );
                false
            }
            Err(error) => {
                tracing::warn!(plugin = %self.path.display(), %error, "cannot tell whether the library was unmapped: /proc/self/maps is unreadable");
                false
            }
        }
    }
}

impl Drop for Library {
    /// Closes the library as [`Library::close`] does; one that a thread may still use is
    /// left loaded for good (a leak, never a crash), with a warning.
    fn drop(&mut self) {
        if self.raw.is_none() {
            return;
        }
        match self.newcomers(&|_| false) {
            Ok(threads) if threads.is_empty() => {
                self.close_inner();
            }
            outcome => {
                let threads = match outcome {
                    Ok(threads) => threads.iter().map(ToString::to_string).collect(),
                    Err(error) => vec![format!("unknown: {error}")],
                };
                tracing::warn!(
                    plugin = %self.path.display(),
                    service = %self.manifest.name,
                    threads = %threads.join(", "),
                    "library left loaded for good: threads it did not get from the host may still run its code"
                );
                // Never closed: leaking the handle keeps the code mapped.
                std::mem::forget(self.raw.take());
            }
        }
    }
}

/// Whether a library's destructors never returned from `dlclose`: the dynamic loader's lock
/// is then held for good, nothing can be loaded, and any thread's first use of a
/// thread-local with a destructor waits for ever. A host should save what it can and exit.
pub fn loader_wedged() -> bool {
    LOADER_WEDGED.load(Ordering::Acquire)
}

/// Whether the dynamic loader's lock may be held now, maybe for good: a `dlclose` is under
/// way or never returned. A new thread's first use of a thread-local with a destructor
/// would then wait for that lock: work that must finish should stay on threads that are
/// ready (see `daemon`).
pub fn loader_busy() -> bool {
    loader_wedged() || CLOSING.load(Ordering::Acquire) > 0
}

/// Whether a file of that path is mapped into this process (per `/proc/self/maps`).
pub fn is_mapped(path: &Path) -> std::io::Result<bool> {
    let maps = fs::read_to_string("/proc/self/maps")?;
    let needle = path.to_string_lossy();
    Ok(maps.lines().any(|line| {
        line.split_once('/')
            .map(|(_, rest)| {
                let mapped = format!("/{rest}");
                mapped == needle || mapped.strip_suffix(" (deleted)") == Some(&*needle)
            })
            .unwrap_or(false)
    }))
}
