use std::{
    fs,
    io::Write,
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::Duration,
};

use abi_stable::{
    abi_stability::abi_checking::{
        check_layout_compatibility_with_globals, AbiInstability, AbiInstabilityError,
        CheckingGlobals,
    },
    library::{AbiHeaderRef, LibHeader, RootModule, ROOT_MODULE_LOADER_NAME_WITH_NUL},
    sabi_types::{VersionNumber, VersionStrings},
    type_layout::TLFieldOrFunction,
    StableAbi,
};
use libloading::os::unix::{Library as RawLibrary, RTLD_LOCAL, RTLD_NOW};
use plugin_api::abi::PluginModRef;
use sha2::{Digest, Sha256};

use super::{
    manifest::lossy,
    probe::{Probe, StateSource},
    threads::{self, Census, ThreadInfo},
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

    /// Loads the plugin at `path`: copies it to a shadow path, opens the copy, checks its
    /// ABI and its `plugin-api` version, initializes its root module and reads its manifest.
    pub fn load(&self, path: &Path) -> Result<Library, LoadError> {
        self.load_file(&PluginFile::read(path)?)
    }

    /// How many loads failed.
    pub fn load_failures(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }

    /// Like [`Loader::load`], for a file already read (and hashed).
    pub fn load_file(&self, file: &PluginFile) -> Result<Library, LoadError> {
        let loaded = self.load_file_inner(file);
        if loaded.is_err() {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
        loaded
    }

    fn load_file_inner(&self, file: &PluginFile) -> Result<Library, LoadError> {
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
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let stem = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("plugin");
        let shadow = self
            .shadow_dir
            .path()
            .join(format!("{stem}-{}-{id}.so", std::process::id()));
        fs::File::create(&shadow)
            .and_then(|mut f| f.write_all(bytes))
            .map_err(|source| {
                let _ = fs::remove_file(&shadow);
                LoadError::ShadowCopy {
                    path: path.to_owned(),
                    shadow: shadow.clone(),
                    source,
                }
            })?;

        if let Some(probe) = &self.probe {
            // Proven in a throwaway process first: a file that crashes or hangs there is
            // never opened here.
            if let Err(error) = probe.check(&shadow, path, self.states.get().map(|s| &**s)) {
                let _ = fs::remove_file(&shadow);
                return Err(error);
            }
        }
        let opened = open(path, &shadow, sha256).map(|mut library| {
            library.close_timeout = self.close_timeout;
            library
        });
        // The mapping keeps the file's content alive; the name is no longer needed.
        let _ = fs::remove_file(&shadow);
        if opened.is_ok() {
            self.opened.fetch_add(1, Ordering::Relaxed);
        }
        opened
    }
}

/// Whether the file system of `dir` is mounted noexec (nothing can be mapped from it).
fn is_noexec(dir: &Path) -> bool {
    nix::sys::statvfs::statvfs(dir)
        .is_ok_and(|fs| fs.flags().contains(nix::sys::statvfs::FsFlags::ST_NOEXEC))
}

/// What every shadow directory's name starts with.
const SHADOW_PREFIX: &str = "microkernel-shadow-";
/// The file in a shadow directory that its host holds a lock on.
const OWNER_FILE: &str = ".owner";

/// Creates the owner file of a shadow directory already locked: it is locked under another
/// name, then renamed, so that no other host ever sees it unlocked while this one lives.
fn lock_owner_file(dir: &Path) -> std::io::Result<nix::fcntl::Flock<fs::File>> {
    let staging = dir.join(".owner.new");
    let file = fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .open(&staging)?;
    let locked = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|(_, errno)| std::io::Error::from(errno))?;
    fs::rename(&staging, dir.join(OWNER_FILE))?;
    Ok(locked)
}

/// Removes the shadow directories in `parent` that a host left when it died (killed before
/// it could remove its own): this user's, with an owner file no live host holds a lock on.
/// Directories without an owner file are left alone. Returns what it removed.
fn remove_stale_shadow_dirs(parent: &Path) -> Vec<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let me = nix::unistd::geteuid().as_raw();
    let mut removed = Vec::new();
    for entry in fs::read_dir(parent).into_iter().flatten().flatten() {
        let path = entry.path();
        let ours = entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with(SHADOW_PREFIX))
            && fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir() && m.uid() == me);
        if !ours {
            continue;
        }
        let Ok(owner) = fs::OpenOptions::new()
            .write(true)
            .open(path.join(OWNER_FILE))
        else {
            continue;
        };
        // The lock is held while the directory goes: no host can take it meanwhile.
        if let Ok(_held) =
            nix::fcntl::Flock::lock(owner, nix::fcntl::FlockArg::LockExclusiveNonblock)
        {
            if fs::remove_dir_all(&path).is_ok() {
                removed.push(path);
            }
        }
    }
    removed
}

/// Opens the library at `open_path` (named `path` in errors) and checks it, with no shadow
/// copy: the loader's last step, and all that a probe does in its child process.
pub(super) fn open(path: &Path, open_path: &Path, sha256: &[u8; 32]) -> Result<Library, LoadError> {
    let read_err = |source| LoadError::Read {
        path: path.to_owned(),
        source,
    };
    // Threads alive before the library's code first runs: any other thread found alive
    // when it is closed may be running its code (see `threads`).
    let baseline = Census::take().map_err(read_err)?;
    // SAFETY: opening a library runs its initializers. Plugin files are code the operator
    // chose to run in this process (and that a probe, when configured, ran first in a
    // child process); Rust cdylibs built with `export_service!` have no initializers beyond
    // the standard library's.
    let opened = unsafe { RawLibrary::open(Some(open_path), RTLD_NOW | RTLD_LOCAL) };
    let raw = opened.map_err(|e| LoadError::Open {
        path: path.to_owned(),
        reason: libloading_reason(&e),
    })?;

    // From here on, errors are turned into strings before `raw` is closed: the library
    // below closes it when dropped, as safely as any other.
    let mut library = Library {
        path: path.to_owned(),
        shadow: open_path.to_owned(),
        sha256: *sha256,
        manifest: Manifest::placeholder(),
        module: None,
        raw: Some(raw),
        baseline,
        id: NEXT_LIBRARY_ID.fetch_add(1, Ordering::Relaxed),
        close_timeout: DEFAULT_CLOSE_TIMEOUT,
    };
    let module = check_and_init(path, library.raw.as_ref().expect("just opened"))?;
    library.module = Some(module);
    library.manifest = Manifest::from_raw(&(module.manifest())()).map_err(|reason| {
        LoadError::InvalidManifest {
            path: path.to_owned(),
            reason,
        }
    })?;
    Ok(library)
}

/// A plugin file's content and its SHA-256, read once: what a rescan compares, and what
/// [`Loader::load_file`] opens.
#[derive(Debug, Clone)]
pub struct PluginFile {
    path: PathBuf,
    bytes: Vec<u8>,
    sha256: [u8; 32],
    /// Permission bits and owner of the file read.
    mode: u32,
    uid: u32,
}

/// The largest plugin file read: anything bigger is refused unread.
pub const MAX_PLUGIN_SIZE: u64 = 1 << 30;

impl PluginFile {
    /// Reads and hashes the file at `path`, which must be a regular file of at most
    /// [`MAX_PLUGIN_SIZE`] bytes. Opened non-blocking: a path that names something that
    /// blocks readers (a FIFO, a symbolic link to `/proc/kmsg`) is refused, not waited on.
    pub fn read(path: &Path) -> Result<Self, LoadError> {
        use std::{io::Read, os::unix::fs::OpenOptionsExt};
        let read_err = |source| LoadError::Read {
            path: path.to_owned(),
            source,
        };
        let file = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .map_err(read_err)?;
        let metadata = file.metadata().map_err(read_err)?;
        if !metadata.is_file() {
            return Err(read_err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "not a regular file",
            )));
        }
        let too_large = |len| LoadError::TooLarge {
            path: path.to_owned(),
            len,
            max: MAX_PLUGIN_SIZE,
        };
        if metadata.len() > MAX_PLUGIN_SIZE {
            return Err(too_large(metadata.len()));
        }
        let mut bytes = Vec::with_capacity(metadata.len() as usize);
        // Bounded even when the size said is not the size read (files of /proc).
        file.take(MAX_PLUGIN_SIZE + 1)
            .read_to_end(&mut bytes)
            .map_err(read_err)?;
        if bytes.len() as u64 > MAX_PLUGIN_SIZE {
            return Err(too_large(bytes.len() as u64));
        }
        let sha256 = Sha256::digest(&bytes).into();
        use std::os::unix::fs::MetadataExt;
        Ok(PluginFile {
            path: path.to_owned(),
            bytes,
            sha256,
            mode: metadata.mode(),
            uid: metadata.uid(),
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The SHA-256 of the content read.
    pub fn sha256(&self) -> &[u8; 32] {
        &self.sha256
    }

    /// The file's permission bits and owner (uid), as it was read.
    pub fn mode_and_owner(&self) -> (u32, u32) {
        (self.mode, self.uid)
    }
}

/// Refuses files that are not ELF, and ELF files cut short (their section header table must
/// fit in the file), before the dynamic loader sees them.
fn check_elf(path: &Path, bytes: &[u8]) -> Result<(), LoadError> {
    if bytes.len() < 4 || &bytes[..4] != b"\x7fELF" {
        return Err(LoadError::NotSharedLibrary {
            path: path.to_owned(),
        });
    }
    // Only 64-bit little-endian ELF (x86_64, aarch64) is inspected further.
    if bytes.len() < 64 || bytes[4] != 2 || bytes[5] != 1 {
        return Ok(());
    }
    let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
    let u16_at = |at: usize| u64::from(u16::from_le_bytes([bytes[at], bytes[at + 1]]));
    // Offsets come from the file: a garbage header must not overflow (saturate instead, and
    // the file is reported as shorter than it claims).
    let table_end = |offset: usize, entry_size: usize, count: usize| {
        u64_at(offset).saturating_add(u16_at(entry_size) * u16_at(count))
    };
    let needed = table_end(0x28, 0x3A, 0x3C).max(table_end(0x20, 0x36, 0x38));
    let len = bytes.len() as u64;
    if needed > len {
        return Err(LoadError::Truncated {
            path: path.to_owned(),
            len,
            needed,
        });
    }
    Ok(())
}

/// libloading's `Display` says only "dlopen failed"; the loader's message is in the source.
fn libloading_reason(error: &libloading::Error) -> String {
    match std::error::Error::source(error) {
        Some(source) => source.to_string(),
        None => error.to_string(),
    }
}

fn version_string(strings: VersionStrings) -> String {
    match VersionNumber::new(strings) {
        Ok(v) => format!("{}.{}.{}", v.major, v.minor, v.patch),
        Err(_) => "(unparsable)".to_owned(),
    }
}

/// Whether a plugin built against `plugin` can be used by a host built against `host`:
/// same `0.x` minor, or same major from 1.0 on.
fn api_compatible(host: VersionNumber, plugin: VersionNumber) -> bool {
    host.major == plugin.major && (host.major != 0 || host.minor == plugin.minor)
}

fn check_and_init(path: &Path, raw: &RawLibrary) -> Result<PluginModRef, LoadError> {
    let symbol = ROOT_MODULE_LOADER_NAME_WITH_NUL;
    // SAFETY: a plugin exports its `LibHeader` static under this name; the symbol's address
    // is read as a reference to it (which is what `AbiHeaderRef` is), and `upgrade` checks
    // abi_stable's magic bytes and version before reading further. The reference does not
    // outlive `raw`: it is used in this function only.
    let header: AbiHeaderRef = match unsafe { raw.get::<AbiHeaderRef>(symbol.as_bytes()) } {
        Ok(symbol) => *symbol,
        Err(_) => {
            return Err(LoadError::NotAPlugin {
                path: path.to_owned(),
                symbol: symbol.trim_end_matches('\0').to_owned(),
            })
        }
    };
    let lib_header: &LibHeader = header.upgrade().map_err(|e| LoadError::AbiMismatch {
        path: path.to_owned(),
        summary: lossy(format!("incompatible abi_stable: {e}").as_bytes()),
        report: lossy(format!("{e:#?}").as_bytes()),
    })?;

    let host_abi = <PluginModRef as RootModule>::VERSION_STRINGS;
    let plugin_abi = lib_header.version_strings();
    match (VersionNumber::new(host_abi), VersionNumber::new(plugin_abi)) {
        (Ok(host), Ok(plugin)) if api_compatible(host, plugin) => {}
        _ => {
            return Err(LoadError::VersionMismatch {
                path: path.to_owned(),
                host: version_string(host_abi),
                plugin: version_string(plugin_abi),
            })
        }
    }

    let Some(found) = lib_header.layout() else {
        return Err(LoadError::AbiMismatch {
            path: path.to_owned(),
            summary: "the plugin exports no layout information".to_owned(),
            report: String::new(),
        });
    };
    // A fresh checker every time: the process-wide one keeps pointers into every library it
    // has checked, which dangle once a library is closed.
    let checker = CheckingGlobals::new();
    if let Err(errors) = check_layout_compatibility_with_globals(
        <PluginModRef as StableAbi>::LAYOUT,
        found,
        &checker,
    ) {
        let summary = errors
            .errors
            .last()
            .map(summarize_mismatch)
            .unwrap_or_else(|| "the layouts differ".to_owned());
        // abi_stable formats names read from the library: a corrupt one's are any bytes.
        return Err(LoadError::AbiMismatch {
            path: path.to_owned(),
            summary: lossy(summary.as_bytes()),
            report: lossy(errors.to_string().as_bytes()),
        });
    }

    // SAFETY: the layout of the plugin's root module was checked against `PluginModRef` just
    // above, with the same checker abi_stable itself would use.
    unsafe { lib_header.init_root_module_with_unchecked_layout::<PluginModRef>() }.map_err(|e| {
        LoadError::Init {
            path: path.to_owned(),
            reason: lossy(e.to_string().as_bytes()),
        }
    })
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The innermost mismatch in one line: where (`PluginMod.manifest.__returns`) and what.
fn summarize_mismatch(error: &AbiInstabilityError) -> String {
    let at = error
        .stack_trace
        .iter()
        .map(|step| match &step.expected {
            TLFieldOrFunction::Field(field) => field.name(),
            TLFieldOrFunction::Function(function) => function.name.as_str(),
        })
        .filter(|name| !name.is_empty() && *name != "0")
        .collect();
    let mut at: Vec<&str> = at;
    // A function pointer is named after its field: `manifest.manifest` says it twice.
    at.dedup();
    let returns = at.last() == Some(&"__returns");
    if returns {
        at.pop();
    }
    let what: Vec<String> = error
        .errs
        .iter()
        .map(|e| match e {
            AbiInstability::Name(types) => {
                format!(
                    "expected type `{}`, found `{}`",
                    types.expected, types.found
                )
            }
            other => one_line(&format!("{other:?}")),
        })
        .collect();
    let at = match (at.is_empty(), returns) {
        (true, _) => "the root module".to_owned(),
        (false, false) => format!("field `{}`", at.join(".")),
        (false, true) => format!("the return type of `{}`", at.join(".")),
    };
    format!("{at}: {}", what.join("; "))
}

/// One opened plugin file: its manifest and its root module.
///
/// Shared as `Arc<Library>` by the kernel (which keeps the service's current library) and by
/// every [`super::Instance`] created from it. Closed by [`Library::close`], or on drop.
pub struct Library {
    path: PathBuf,
    shadow: PathBuf,
    sha256: [u8; 32],
    manifest: Manifest,
    /// Points into `raw`; never handed out. `None` only while loading.
    module: Option<PluginModRef>,
    /// `None` once closed.
    raw: Option<RawLibrary>,
    /// The threads alive before the library was opened.
    baseline: Census,
    /// Names the library when threads are attributed to it (see `threads`).
    id: threads::LibraryId,
    /// How long `dlclose` may take.
    close_timeout: Duration,
}

/// How long closing a library may take unless the loader says otherwise.
const DEFAULT_CLOSE_TIMEOUT: Duration = Duration::from_secs(30);

/// The next [`Library`]'s id.
static NEXT_LIBRARY_ID: AtomicU64 = AtomicU64::new(1);

/// Set once a `dlclose` did not return in time: a library destructor hangs while holding the
/// dynamic loader's lock, so nothing can be opened any more (it would wait for ever).
static LOADER_WEDGED: AtomicBool = AtomicBool::new(false);

/// How many `dlclose` calls are under way: while one is, the dynamic loader's lock is held,
/// maybe for good.
static CLOSING: AtomicU64 = AtomicU64::new(0);

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

    pub(super) fn module(&self) -> PluginModRef {
        self.module.expect("a loaded library has a root module")
    }

    /// The threads that may run this library's code although the host did not start them:
    /// alive now, not alive when it was opened, not the host's, and not attributed by
    /// `elsewhere` (given a thread's name) to something else.
    pub fn newcomers(&self, elsewhere: &dyn Fn(&str) -> bool) -> std::io::Result<Vec<ThreadInfo>> {
        threads::newcomers(&self.baseline, self.id, elsewhere)
    }

    /// Names the library when threads are attributed to it.
    pub(super) fn id(&self) -> threads::LibraryId {
        self.id
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

/// Ends the process now with `code`, without running anything registered to run at exit:
/// in particular not the destructors of the plugin libraries still loaded (plugin code,
/// which could hang or crash the process at its very end). Standard error is unbuffered;
/// flush anything else first.
pub fn exit_without_destructors(code: i32) -> ! {
    // SAFETY: `_exit` ends the process at once; no Rust invariant depends on destructors or
    // `atexit` handlers running (the kernel's state is already saved by the caller).
    unsafe { libc::_exit(code) }
}

/// Limits glibc's malloc to `arenas` arenas, unless the environment says otherwise
/// (`MALLOC_ARENA_MAX`). Call it before starting threads. By default glibc keeps up to eight
/// arenas per core, one more for each thread that finds the others busy; a host that starts
/// a thread per service instance then grows for hundreds of hot replaces before its
/// resident memory settles (1.6 MB over 400 swaps here, against 0.1 MB with two arenas).
/// The fewer the arenas, the less of a swap's large buffers lands on pages an arena just gave
/// back (each page faulted in again): with one arena a 16 MiB swap pause is 0.92 of its
/// floor on a 2-CPU machine, with two 1.12 to 1.17 (see docs/PERFORMANCE.md).
pub fn limit_malloc_arenas(arenas: i32) {
    if std::env::var_os("MALLOC_ARENA_MAX").is_some() {
        return;
    }
    // SAFETY: `mallopt` only sets a parameter of the C allocator; M_ARENA_MAX takes effect
    // for arenas created from now on, and no Rust invariant depends on it.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, arenas);
    }
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

#[cfg(test)]
pub(super) fn check_elf_for_tests(path: &Path, bytes: &[u8]) -> Result<(), LoadError> {
    check_elf(path, bytes)
}
