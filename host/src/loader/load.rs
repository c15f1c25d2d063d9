//! [`Loader`]: opens plugin files (read, checked, shadow-copied, proven by the probe, opened).

use std::{
    fs,
    io::Write,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use super::{
    file::{check_elf, PluginFile},
    library::{Library, DEFAULT_CLOSE_TIMEOUT, LOADER_WEDGED},
    open::open,
    probe::{Probe, StateSource},
    shadow::{is_noexec, lock_owner_file, remove_stale_shadow_dirs, SHADOW_PREFIX},
    LoadError, Manifest,
};

/// Opens plugin files. Owns the private directory that holds the shadow copies.
///
/// One per kernel; lives as long as the kernel.
pub struct Loader {
    shadow_dir: tempfile::TempDir,
    /// Held for the loader's life: a shadow directory whose owner lock nobody holds was left
    /// by a host that died, and is removed by the next one (see [`remove_stale_shadow_dirs`]).
    _owner: nix::fcntl::Flock<fs::File>,
    probe: Option<Probe>,
    /// Where the probe finds the state a service would import.
    states: std::sync::OnceLock<Box<StateSource>>,
    close_timeout: Duration,
    next_id: AtomicU64,
    opened: AtomicU64,
    /// Loads that failed (the file's fault or not).
    failed: AtomicU64,
}

impl std::fmt::Debug for Loader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loader")
            .field("shadow_dir", &self.shadow_dir.path())
            .field("probe", &self.probe)
            .finish_non_exhaustive()
    }
}

impl Loader {
    /// Creates a loader whose shadow copies go to a new private directory inside `parent`
    /// (the system's temporary directory when `None`). That file system must allow executable
    /// mappings (not `noexec`).
    ///
    /// With a `probe`, every file is first opened in a child process (see [`Probe`]).
    pub fn new(parent: Option<&Path>, probe: Option<Probe>) -> std::io::Result<Self> {
        let parent = parent.map_or_else(std::env::temp_dir, Path::to_owned);
        for removed in remove_stale_shadow_dirs(&parent) {
            tracing::info!(dir = %removed.display(), "removed the shadow directory of a host that is gone");
        }
        let mut builder = tempfile::Builder::new();
        builder
            .prefix(SHADOW_PREFIX)
            .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700));
        let in_parent = |e: std::io::Error| {
            std::io::Error::new(
                e.kind(),
                format!("creating a shadow directory in {}: {e}", parent.display()),
            )
        };
        if is_noexec(&parent) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "the shadow directory's file system ({}) is mounted noexec: no plugin can be mapped from it; choose another with --shadow-dir",
                    parent.display()
                ),
            ));
        }
        let shadow_dir = builder.tempdir_in(&parent).map_err(in_parent)?;
        let owner = lock_owner_file(shadow_dir.path()).map_err(in_parent)?;
        Ok(Loader {
            shadow_dir,
            _owner: owner,
            probe,
            states: std::sync::OnceLock::new(),
            close_timeout: DEFAULT_CLOSE_TIMEOUT,
            next_id: AtomicU64::new(0),
            opened: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        })
    }

    /// How long closing a library may take (its destructors run then) before the loader
    /// gives up on it (see [`LoadError::LoaderWedged`]).
    pub fn with_close_timeout(mut self, timeout: Duration) -> Self {
        self.close_timeout = timeout;
        self
    }

    /// The private directory the shadow copies are made in (removed when the loader is
    /// dropped).
    pub fn shadow_dir(&self) -> &Path {
        self.shadow_dir.path()
    }

    /// Tells the probe where to find the state a service would import (once; later calls
    /// are ignored): the probe then also has that state imported and exported again.
    pub fn set_state_source(&self, states: Box<StateSource>) {
        let _ = self.states.set(states);
    }

    /// How many libraries this loader has opened (`dlopen` calls that succeeded).
    pub fn libraries_opened(&self) -> u64 {
        self.opened.load(Ordering::Relaxed)
    }

    /// Loads the plugin at `path`: copies it to a shadow path, has the copy proven by the
    /// probe (when the loader has one), opens it, checks its ABI, initializes its root
    /// module and reads its manifest.
    ///
    /// # Safety
    ///
    /// Opening a library runs its initializers in this process, and every later call into
    /// its instances runs its code here: nothing the host checks (the ELF header, the probe,
    /// the ABI version and layout) can prove that code sound. The caller vouches that the
    /// file is a plugin built with the microkernel SDK by someone trusted to run code in
    /// the host, as the operator does for the files of the plugins directory (README,
    /// "Trust"). What the host does check turns the common accidents (a truncated or
    /// corrupt file, another ABI, a crash in the initializers) into errors.
    pub unsafe fn load(&self, path: &Path) -> Result<Library, LoadError> {
        // SAFETY: the caller vouches for the file (see above).
        unsafe { self.load_file(&PluginFile::read(path)?) }
    }

    /// How many loads failed.
    pub fn load_failures(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }

    /// Like [`Loader::load`], for a file already read (and hashed).
    ///
    /// # Safety
    ///
    /// As for [`Loader::load`]: the caller vouches for the file.
    pub unsafe fn load_file(&self, file: &PluginFile) -> Result<Library, LoadError> {
        let copy = self.copy(file)?;
        self.prove(&copy)?;
        // SAFETY: the caller vouches for the file.
        unsafe { self.open_copy(copy) }
    }

    /// Checks a file's header and makes its private copy (with the libraries it finds
    /// through `$ORIGIN` beside it): the first step of every load, in process or in a
    /// worker. Counted as a failed load when it fails.
    pub fn copy(&self, file: &PluginFile) -> Result<ShadowCopy, LoadError> {
        let copied = self.copy_inner(file);
        if copied.is_err() {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
        copied
    }

    fn copy_inner(&self, file: &PluginFile) -> Result<ShadowCopy, LoadError> {
        let PluginFile {
            path,
            bytes,
            sha256,
            ..
        } = file;
        let path = path.as_path();
        check_elf(path, bytes)?;
        if LOADER_WEDGED.load(Ordering::Acquire) {
            return Err(LoadError::LoaderWedged {
                path: path.to_owned(),
            });
        }

        // A shadow directory whose file system was remounted noexec maps nothing: the host's
        // trouble, not the file's.
        if is_noexec(self.shadow_dir.path()) {
            return Err(LoadError::ShadowNoexec {
                path: path.to_owned(),
                shadow_dir: self.shadow_dir.path().to_owned(),
            });
        }
        // A unique private copy: `dlopen` of a path (or inode) that is already open returns
        // the library already loaded, and overwriting a mapped file crashes the process.
        // A plugin with libraries of its own (found through `$ORIGIN`) gets a directory of
        // its own, where they are copied beside it (see `origin.rs`).
        let bundled = super::origin::bundled(path, bytes);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let stem = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("plugin");
        let unique = format!("{stem}-{}-{id}", std::process::id());
        let (shadow, own_dir) = if bundled.is_empty() {
            (self.shadow_dir.path().join(format!("{unique}.so")), None)
        } else {
            let dir = self.shadow_dir.path().join(&unique);
            let name = path
                .file_name()
                .unwrap_or(std::ffi::OsStr::new("plugin.so"));
            (dir.join(name), Some(dir))
        };
        // Everything copied for this load goes when the copy is dropped.
        let copy = ShadowCopy {
            path: path.to_owned(),
            shadow,
            own_dir,
            sha256: *sha256,
        };
        if let Some(dir) = &copy.own_dir {
            for library in &bundled {
                let target = dir.join(&library.relative);
                let copied = target
                    .parent()
                    .map_or(Ok(()), fs::create_dir_all)
                    .and_then(|()| crate::bounded::read(&library.source, super::MAX_PLUGIN_SIZE))
                    .and_then(|read| fs::write(&target, read.bytes));
                if let Err(source) = copied {
                    return Err(LoadError::Bundled {
                        path: path.to_owned(),
                        library: library.source.clone(),
                        shadow: target,
                        source,
                    });
                }
            }
        }
        fs::File::create(&copy.shadow)
            .and_then(|mut f| f.write_all(bytes))
            .map_err(|source| LoadError::ShadowCopy {
                path: path.to_owned(),
                shadow: copy.shadow.clone(),
                source,
            })?;
        Ok(copy)
    }

    /// Has the copy proven by the probe, when the loader has one; returns the manifest the
    /// probe read (`None` without a probe, or when the probe found no valid one).
    pub fn prove(&self, copy: &ShadowCopy) -> Result<Option<Manifest>, LoadError> {
        let Some(probe) = &self.probe else {
            return Ok(None);
        };
        // Proven in a throwaway process first: a file that crashes or hangs there is never
        // opened here.
        let proven = probe.check(&copy.shadow, &copy.path, self.states.get().map(|s| &**s));
        if proven.is_err() {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
        proven
    }

    /// Opens a copy in this process.
    ///
    /// # Safety
    ///
    /// As for [`Loader::load`]: the caller vouches for the file.
    pub unsafe fn open_copy(&self, copy: ShadowCopy) -> Result<Library, LoadError> {
        let opened = open(&copy.path, &copy.shadow, &copy.sha256).map(|mut library| {
            library.close_timeout = self.close_timeout;
            library
        });
        // The mappings keep the files' content alive; the names are no longer needed (the
        // copy goes with them).
        drop(copy);
        match &opened {
            Ok(_) => self.opened.fetch_add(1, Ordering::Relaxed),
            Err(_) => self.failed.fetch_add(1, Ordering::Relaxed),
        };
        opened
    }
}

/// The private copy of a plugin file that is opened (in process, or by a worker), removed
/// with everything copied beside it when dropped.
#[derive(Debug)]
pub struct ShadowCopy {
    path: PathBuf,
    shadow: PathBuf,
    own_dir: Option<PathBuf>,
    sha256: [u8; 32],
}

impl ShadowCopy {
    /// The plugin file it copies.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The copy.
    pub fn shadow(&self) -> &Path {
        &self.shadow
    }

    /// The SHA-256 of the file's content.
    pub fn sha256(&self) -> &[u8; 32] {
        &self.sha256
    }
}

impl Drop for ShadowCopy {
    fn drop(&mut self) {
        match &self.own_dir {
            Some(dir) => {
                let _ = fs::remove_dir_all(dir);
            }
            None => {
                let _ = fs::remove_file(&self.shadow);
            }
        }
    }
}
