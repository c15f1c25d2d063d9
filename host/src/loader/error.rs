use std::{path::PathBuf, time::Duration};

/// Why a plugin file could not be loaded. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read.
    #[error("failed to read plugin {path}")]
    Read {
        /// The plugin file.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
    /// The private copy the host opens could not be written (a full or read-only shadow
    /// directory): nothing is wrong with the file itself.
    #[error("failed to load plugin {path}: writing its private copy {shadow} failed")]
    ShadowCopy {
        /// The plugin file.
        path: PathBuf,
        /// The copy that was being written.
        shadow: PathBuf,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
    /// The shadow directory's file system is mounted noexec: nothing can be mapped from it.
    #[error("failed to load plugin {path}: the shadow directory {shadow_dir} is on a file system mounted noexec; remount it, or restart the host with another --shadow-dir")]
    ShadowNoexec {
        /// The plugin file.
        path: PathBuf,
        /// The shadow directory.
        shadow_dir: PathBuf,
    },
    /// The file has no ELF header: it is not a shared library at all.
    #[error("failed to load plugin {path}: not a shared library (no ELF header)")]
    NotSharedLibrary {
        /// The plugin file.
        path: PathBuf,
    },
    /// The file is an ELF file shorter than its own headers say: it was cut off, for example
    /// by a copy that had not finished.
    #[error("failed to load plugin {path}: truncated shared library ({len} bytes, its headers need {needed})")]
    Truncated {
        /// The plugin file.
        path: PathBuf,
        /// Its length.
        len: u64,
        /// The length its ELF headers describe.
        needed: u64,
    },
    /// The file has its full length but its end is still zeros (its section table is
    /// blank): a file being written in place, not yet finished.
    #[error("failed to load plugin {path}: it looks unfinished (its ELF section table, at {offset}, is still blank): is it still being written? Deploy by renaming a finished copy; it is read again when it changes")]
    Unfinished {
        /// The plugin file.
        path: PathBuf,
        /// Where its section table starts.
        offset: u64,
    },
    /// A library it finds through `$ORIGIN` could not be copied beside its private copy.
    #[error("could not copy {library}, which plugin {path} finds through $ORIGIN, beside its private copy {shadow}")]
    Bundled {
        /// The plugin file.
        path: PathBuf,
        /// The library.
        library: PathBuf,
        /// Where it was to go.
        shadow: PathBuf,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
    /// `dlopen` refused the file.
    #[error("failed to load plugin {path}: {reason}")]
    Open {
        /// The plugin file.
        path: PathBuf,
        /// The dynamic loader's message.
        reason: String,
    },
    /// The library does not export a plugin root module.
    #[error("failed to load plugin {path}: not a microkernel plugin (it does not export `{symbol}`; plugins call `plugin_api::export_service!`)")]
    NotAPlugin {
        /// The plugin file.
        path: PathBuf,
        /// The missing symbol.
        symbol: String,
    },
    /// The plugin was built against another ABI (`microkernel-plugin-abi` version) than the
    /// host's. The SDK's version does not matter.
    #[error("failed to load plugin {path}: built against ABI {plugin} (microkernel-plugin-abi), but this host speaks ABI {host}; rebuild the plugin with an SDK of ABI {host}")]
    VersionMismatch {
        /// The plugin file.
        path: PathBuf,
        /// The host's ABI version.
        host: String,
        /// The plugin's ABI version.
        plugin: String,
    },
    /// The layout of the plugin's types differs from the host's.
    #[error("failed to load plugin {path}: ABI mismatch: {summary}")]
    AbiMismatch {
        /// The plugin file.
        path: PathBuf,
        /// The first mismatch, in one line.
        summary: String,
        /// abi_stable's whole report (long; logged at debug level).
        report: String,
    },
    /// The plugin's root module failed to initialize.
    #[error("failed to load plugin {path}: its root module failed to initialize: {reason}")]
    Init {
        /// The plugin file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The plugin's manifest is invalid (service name, version or dependency).
    #[error("failed to load plugin {path}: invalid manifest: {reason}")]
    InvalidManifest {
        /// The plugin file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Opening the file in a probe process killed that process, or it ended abnormally: the
    /// host does not open it.
    #[error("failed to load plugin {path}: {step} in a probe process, the process was {how}: the file is corrupt, or its code crashes{}", if stderr.is_empty() { String::new() } else { format!(" (the probe said: {stderr})") })]
    ProbeCrashed {
        /// The plugin file.
        path: PathBuf,
        /// What the probe was doing: `opening it`, `importing the service's state into it`.
        step: &'static str,
        /// How the process ended (`killed by SIGSEGV`).
        how: String,
        /// The end of what the process wrote to its standard error.
        stderr: String,
    },
    /// The probe process did not finish in time (it was killed): the host does not open the
    /// file.
    #[error("failed to load plugin {path}: {step} in a probe process took longer than {timeout:?} (the process was killed): its code hangs")]
    ProbeTimedOut {
        /// The plugin file.
        path: PathBuf,
        /// What the probe was doing.
        step: &'static str,
        /// The probe's time limit.
        timeout: Duration,
    },
    /// The probe process could not be started.
    #[error("failed to load plugin {path}: could not run the probe {program}")]
    ProbeFailed {
        /// The plugin file.
        path: PathBuf,
        /// The program run as the probe.
        program: PathBuf,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
    /// The probe process ended before it got to the file: the host's machinery failed (the
    /// program is not this host, a thread or memory limit stopped it), not the file. The
    /// file is tried again at the next rescan.
    #[error("could not check plugin {path}: the probe {program} {how} before it opened the file: this is the host's trouble, not the file's; it is tried again at the next rescan{}", if stderr.is_empty() { String::new() } else { format!(" (the probe said: {stderr})") })]
    ProbeDidNotStart {
        /// The plugin file.
        path: PathBuf,
        /// The program run as the probe.
        program: PathBuf,
        /// How the process ended (`exited with status 1`, `killed by SIGKILL`).
        how: String,
        /// The end of what the process wrote to its standard error.
        stderr: String,
    },
    /// The worker process of an isolated service could not be started.
    #[error("failed to load plugin {path}: could not run its worker {program}")]
    WorkerFailed {
        /// The plugin file.
        path: PathBuf,
        /// The program run as the worker.
        program: PathBuf,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
    /// The worker process ended before it got to the file: the host's trouble, not the
    /// file's. The file is tried again at the next rescan.
    #[error("could not load plugin {path}: its worker {program} {how} before it opened the file: this is the host's trouble, not the file's; it is tried again at the next rescan")]
    WorkerDidNotStart {
        /// The plugin file.
        path: PathBuf,
        /// The program run as the worker.
        program: PathBuf,
        /// How the process ended.
        how: String,
    },
    /// Opening the file killed its worker process, or the worker went silent.
    #[error("failed to load plugin {path}: opening it in a worker process, the process {how}: the file is corrupt, or its code crashes")]
    WorkerCrashed {
        /// The plugin file.
        path: PathBuf,
        /// How the process ended.
        how: String,
    },
    /// The worker process was killed from outside while it opened the file (SIGKILL the host
    /// did not send: an operator, the OOM killer): not the file's doing; it is tried again
    /// at the next rescan.
    #[error("could not load plugin {path}: its worker process {how} while opening it, by a signal from outside the host (not the file's doing); it is tried again at the next rescan")]
    WorkerKilled {
        /// The plugin file.
        path: PathBuf,
        /// How the process ended.
        how: String,
    },
    /// The worker process opened the file and the loader there refused it.
    #[error("failed to load plugin {path} in a worker process: {reason}")]
    WorkerRefused {
        /// The plugin file.
        path: PathBuf,
        /// The loader's message.
        reason: String,
    },
    /// An earlier library's destructors never returned from `dlclose`, which holds the
    /// dynamic loader's lock: opening anything now would wait for ever.
    #[error("failed to load plugin {path}: an earlier plugin's destructors hang while it is unloaded, holding the dynamic loader's lock; restart the host to load plugins again")]
    LoaderWedged {
        /// The plugin file.
        path: PathBuf,
    },
    /// The file is larger than any plugin the host reads.
    #[error(
        "failed to load plugin {path}: {len} bytes is larger than the {max} bytes a plugin may be"
    )]
    TooLarge {
        /// The plugin file.
        path: PathBuf,
        /// Its length.
        len: u64,
        /// The largest accepted.
        max: u64,
    },
}

impl LoadError {
    /// Whether the failure is the file's own (its content: not a plugin, corrupt, built
    /// against another API, crashing its probe), so that loading the same bytes again would
    /// fail again. A failure from outside the file (it could not be read, its private copy
    /// could not be written, the probe could not be run, the dynamic loader is wedged) is
    /// not: the file is tried again at the next rescan.
    pub fn is_the_files_fault(&self) -> bool {
        !matches!(
            self,
            LoadError::Read { .. }
                | LoadError::ShadowCopy { .. }
                | LoadError::Bundled { .. }
                | LoadError::ShadowNoexec { .. }
                | LoadError::ProbeFailed { .. }
                | LoadError::ProbeDidNotStart { .. }
                | LoadError::WorkerFailed { .. }
                | LoadError::WorkerDidNotStart { .. }
                | LoadError::WorkerKilled { .. }
                | LoadError::LoaderWedged { .. }
        )
    }
}

/// libloading's `Display` says only "dlopen failed"; the loader's message is in the source.
pub(super) fn libloading_reason(error: &libloading::Error) -> String {
    match std::error::Error::source(error) {
        Some(source) => source.to_string(),
        None => error.to_string(),
    }
}
