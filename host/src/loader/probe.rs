//! Proving a plugin file in a throwaway process before the host opens it.
//!
//! Nothing that runs in the host's process can inspect a corrupt shared library safely:
//! `dlopen` maps and relocates it, and abi_stable's checker follows pointers found in it.
//! Same-size copies of a plugin with a few bytes changed crash the process there (SIGSEGV,
//! SIGBUS) about one time in four. So the host runs itself (`microkernel probe`, hidden) in a
//! child process that opens the very bytes the host would open, runs every check, creates
//! and drops an instance, and prints what it found. A child that dies by a signal, exits
//! abnormally or does not finish in time means the file is refused, and the host goes on.
//!
//! A file the child opened and checked without dying is opened by the host, which then
//! reports an ordinary problem (not a plugin, another ABI, a bad manifest) with its own
//! typed error: the same bytes go through the same code.

use std::{
    fs,
    io::{Read, Seek},
    os::unix::process::ExitStatusExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use plugin_api::{abi::LogLevel, codes, Reply};

use super::{open::open, Instance, LoadError, Manifest};
use crate::instance::{HostServices, ServiceInstance as _};

/// How files are proven: which program to run as `PROGRAM probe FILE`, and for how long.
#[derive(Debug, Clone)]
pub struct Probe {
    /// The `microkernel` binary (the daemon uses its own executable).
    pub program: PathBuf,
    /// How long the child may take; past that it is killed and the file refused.
    pub timeout: Duration,
}

/// The line a probe child prints on its standard output when it survived.
const REPORT_PREFIX: &str = "microkernel-probe: ";

/// The line a probe child prints once it runs and is about to open the file: a child that
/// ends without it never got to the file, and the failure is the host's, not the file's.
const READY_LINE: &str = "microkernel-probe: ready";

/// The exit status of a probe child that could not start the thread that opens the file.
const EXIT_NO_THREAD: i32 = 4;

/// At most this much of a child's standard error is kept for the error message.
const STDERR_TAIL: usize = 2048;

/// Where a probe finds the state a service would import: `(exporting version, bytes)`.
pub type StateSource = dyn Fn(&str) -> Option<(String, Vec<u8>)> + Send + Sync;

impl Probe {
    /// A probe running `program` with `timeout`.
    pub fn new(program: PathBuf, timeout: Duration) -> Self {
        Probe { program, timeout }
    }

    /// This very program, to run as the probe: the file this code was mapped from, found in
    /// `/proc/self/maps` by the address of this function (never by `argv[0]`, which whoever
    /// starts the host chooses). That is `/proc/self/exe`, which stays this program even once
    /// its file is replaced by an upgrade, unless this process runs through a loader of its
    /// own (valgrind, the dynamic loader run as a program), where `/proc/self/exe` is that
    /// tool: then the file itself, while it is still the one mapped.
    pub fn this_program() -> PathBuf {
        use std::os::unix::fs::MetadataExt;
        let exe = Path::new("/proc/self/exe");
        let Some((mapped, inode)) = file_mapped_at(Probe::this_program as fn() -> PathBuf as usize)
        else {
            return exe.to_owned();
        };
        if fs::metadata(exe).is_ok_and(|m| m.ino() == inode) {
            return exe.to_owned();
        }
        if fs::metadata(&mapped).is_ok_and(|m| m.ino() == inode && m.is_file()) {
            return mapped;
        }
        exe.to_owned()
    }

    /// Runs the child on `open_path` (the shadow copy the host would open), naming the file
    /// `path` in what it says; then, when `states` has a state for the service the file
    /// provides, once more to have that state imported and exported again (a corrupt
    /// `import_state` crashes there, not in the host). `Ok` when the child survived.
    pub(super) fn check(
        &self,
        open_path: &Path,
        path: &Path,
        states: Option<&StateSource>,
    ) -> Result<Option<Manifest>, LoadError> {
        let started = Instant::now();
        let report = self.run(open_path, path, None, "opening it")?;
        let manifest = reported_manifest(&report);
        let state = manifest
            .as_ref()
            .and_then(|manifest| states.and_then(|states| states(&manifest.name)));
        let report = match state {
            Some(state) => self.run(
                open_path,
                path,
                Some(state),
                "importing the service's state into it",
            )?,
            None => report,
        };
        tracing::debug!(
            plugin = %path.display(),
            took_ms = started.elapsed().as_secs_f64() * 1e3,
            report,
            "probe passed"
        );
        Ok(manifest)
    }

    /// One child: returns its report line once it exited normally.
    fn run(
        &self,
        open_path: &Path,
        path: &Path,
        state: Option<(String, Vec<u8>)>,
        step: &'static str,
    ) -> Result<String, LoadError> {
        let failed = |source: std::io::Error| LoadError::ProbeFailed {
            path: path.to_owned(),
            program: self.program.clone(),
            source,
        };
        let mut out = tempfile::tempfile().map_err(failed)?;
        let mut err = tempfile::tempfile().map_err(failed)?;
        let mut command = Command::new(&self.program);
        command
            .env_remove(crate::state::KEY_VARIABLE)
            .env("MICROKERNEL_PROBE_PARENT", std::process::id().to_string())
            .arg("probe")
            .arg(open_path)
            .arg("--as")
            .arg(path)
            .stdout(Stdio::from(out.try_clone().map_err(failed)?))
            .stderr(Stdio::from(err.try_clone().map_err(failed)?));
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            command.arg("--config-dir").arg(dir);
        }
        match &state {
            Some((version, _)) => {
                command
                    .arg("--import-from")
                    .arg(version)
                    .stdin(Stdio::piped());
            }
            None => {
                command.stdin(Stdio::null());
            }
        }
        let deadline = Instant::now() + self.timeout;
        let mut child = command.spawn().map_err(failed)?;
        if let (Some((_, bytes)), Some(mut stdin)) = (state, child.stdin.take()) {
            // The child reads all of it before opening anything; a child that dies first
            // closes the pipe, and the writer ends.
            let writer = super::threads::spawn_detached("probe-stdin", move || {
                let _ = std::io::Write::write_all(&mut stdin, &bytes);
            });
            writer.map_err(failed)?;
        }
        let mut pause = Duration::from_micros(200);
        let status = loop {
            match child.try_wait().map_err(failed)? {
                Some(status) => break Some(status),
                None if Instant::now() >= deadline => break None,
                None => {
                    std::thread::sleep(
                        pause.min(deadline.saturating_duration_since(Instant::now())),
                    );
                    pause = (pause * 2).min(Duration::from_millis(20));
                }
            }
        };
        if status.is_none() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let out = read_back(&mut out, usize::MAX);
        let stderr = read_back(&mut err, STDERR_TAIL);
        let ready = out.lines().any(|line| line == READY_LINE);
        let report = out
            .lines()
            .filter(|line| *line != READY_LINE)
            .find_map(|line| line.strip_prefix(REPORT_PREFIX))
            .map(str::to_owned);
        let Some(status) = status else {
            if !ready {
                return Err(LoadError::ProbeDidNotStart {
                    path: path.to_owned(),
                    program: self.program.clone(),
                    how: format!("did not get going within {:?}", self.timeout),
                    stderr: one_line_tail(&stderr),
                });
            }
            return Err(LoadError::ProbeTimedOut {
                path: path.to_owned(),
                step,
                timeout: self.timeout,
            });
        };
        // Only a child that never printed the ready line is the host's trouble: it prints it
        // on the thread that opens the file, so one that could not start that thread never
        // did. An exit after it (whatever its status) is the file's code.
        if !ready {
            return Err(LoadError::ProbeDidNotStart {
                path: path.to_owned(),
                program: self.program.clone(),
                how: match (status.code(), status.signal()) {
                    (Some(code), _) => format!("exited with status {code}"),
                    (_, Some(signal)) => format!("was killed by {}", signal_name(signal)),
                    _ => "ended".to_owned(),
                },
                stderr: one_line_tail(&stderr),
            });
        }
        match (status.code(), status.signal(), report) {
            (Some(0), _, Some(report)) => Ok(report),
            (_, Some(signal), _) => Err(LoadError::ProbeCrashed {
                path: path.to_owned(),
                step,
                how: format!("killed by {}", signal_name(signal)),
                stderr: one_line_tail(&stderr),
            }),
            (code, _, _) => Err(LoadError::ProbeCrashed {
                path: path.to_owned(),
                step,
                how: match code {
                    Some(code) => format!("exited with status {code} without a report"),
                    None => "ended without a report".to_owned(),
                },
                stderr: one_line_tail(&stderr),
            }),
        }
    }
}

/// The manifest a probe's report names, when it opened the file and the manifest is valid
/// (`None` for a file it refused: the host's own checks then say why).
fn reported_manifest(report: &str) -> Option<Manifest> {
    let report: serde_json::Value = serde_json::from_str(report).ok()?;
    let dependencies: Vec<String> = report["dependencies"]
        .as_array()?
        .iter()
        .map(|d| d.as_str().map(str::to_owned))
        .collect::<Option<_>>()?;
    Manifest::from_parts(
        report["service"].as_str()?,
        report["version"].as_str()?,
        &dependencies,
    )
    .ok()
}

/// The file mapped at `address` in this process, and its inode, per `/proc/self/maps`
/// (`start-end perms offset dev inode path`).
fn file_mapped_at(address: usize) -> Option<(PathBuf, u64)> {
    let maps = fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (start, end) = fields.next()?.split_once('-')?;
        let (start, end) = (
            usize::from_str_radix(start, 16).ok()?,
            usize::from_str_radix(end, 16).ok()?,
        );
        if !(start..end).contains(&address) {
            return None;
        }
        let inode: u64 = fields.nth(3)?.parse().ok()?;
        let path = fields.next().filter(|p| p.starts_with('/'))?;
        Some((PathBuf::from(path), inode))
    })
}

fn read_back(file: &mut fs::File, limit: usize) -> String {
    let mut bytes = Vec::new();
    let _ = file.rewind();
    let _ = file.read_to_end(&mut bytes);
    let start = bytes.len().saturating_sub(limit);
    String::from_utf8_lossy(&bytes[start..]).into_owned()
}

fn one_line_tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(3)..].join(" | ")
}

fn signal_name(signal: i32) -> String {
    match nix::sys::signal::Signal::try_from(signal) {
        Ok(signal) => signal.as_str().to_owned(),
        Err(_) => format!("signal {signal}"),
    }
}

/// What the probe's instance sees of a host: nothing to talk to.
struct Isolated;

impl HostServices for Isolated {
    fn log(&self, level: LogLevel, target: &str, message: &str) {
        tracing::debug!(?level, module = target, "{message}");
    }

    fn request(&self, to: &str, _kind: &str, _payload: &[u8], _timeout: Duration) -> Reply {
        Reply::error(
            codes::NOT_FOUND,
            format!("no service `{to}`: this is a probe, not a host"),
        )
    }

    fn emit(&self, to: &str, _kind: &str, _payload: &[u8]) -> Result<(), String> {
        Err(format!("no service `{to}`: this is a probe, not a host"))
    }
}

/// `microkernel probe FILE --as PATH [--config-dir DIR] [--import-from VERSION]`, in the
/// child: opens `file`, runs every check, creates an instance (with `<DIR>/<service>.conf`
/// as its configuration, when present), has it import the state read from standard input
/// (exported by `VERSION`) and export it again when asked to, drops it, closes the library,
/// and prints one report line. Returns the exit status: 0 when it got that far, whatever it
/// found.
pub fn run_probe_child(
    file: &Path,
    name: &Path,
    config_dir: Option<&Path>,
    import_from: Option<&str>,
) -> i32 {
    // A probe outlives no host: killed when the thread that started it ends (with its
    // process, or after a timeout). A host already gone leaves nothing to report to.
    let parent = std::env::var("MICROKERNEL_PROBE_PARENT").ok();
    let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL);
    if parent.is_some_and(|p| p != nix::unistd::getppid().to_string()) {
        return 3;
    }
    // Read before anything runs, so that the host's writer never waits on this process.
    let state = import_from.map(|version| {
        let mut bytes = Vec::new();
        let _ = std::io::stdin().read_to_end(&mut bytes);
        (version.to_owned(), bytes)
    });
    // On a thread of its own, as the host loads files on its reload thread: code whose
    // damage depends on the stack it runs on then meets the same kind of stack here.
    // A panic (the checks of a corrupt layout can panic) ends this process without a
    // report, as a crash does: the file is refused without the host opening it.
    let outcome = std::thread::scope(|scope| {
        let thread = std::thread::Builder::new()
            .name("probe".into())
            .spawn_scoped(scope, || {
                println!("{READY_LINE}");
                let _ = std::io::Write::flush(&mut std::io::stdout());
                probe(file, name, config_dir, state.as_ref())
            });
        match thread.map(|thread| thread.join()) {
            Ok(Ok(outcome)) => Ok(outcome),
            Ok(Err(panic)) => std::panic::resume_unwind(panic),
            Err(error) => Err(error),
        }
    });
    match outcome {
        Ok(outcome) => {
            println!("{REPORT_PREFIX}{outcome}");
            0
        }
        Err(error) => {
            eprintln!("microkernel probe: could not start a thread to open the file: {error}");
            EXIT_NO_THREAD
        }
    }
}

fn probe(
    file: &Path,
    name: &Path,
    config_dir: Option<&Path>,
    state: Option<&(String, Vec<u8>)>,
) -> serde_json::Value {
    match open(name, file, &[0; 32]) {
        Ok(library) => {
            let manifest = library.manifest().clone();
            let config = config_dir
                .map(|dir| dir.join(format!("{}.conf", manifest.name)))
                .and_then(|path| {
                    crate::bounded::read_to_string(&path, crate::bounded::MAX_CONFIG_SIZE).ok()
                });
            let library = Arc::new(library);
            let instance = Instance::new(library.clone(), Arc::new(Isolated), config.as_deref());
            let instance = match instance {
                Ok(mut instance) => {
                    let mut did = "created and dropped an instance".to_owned();
                    if let Some((version, bytes)) = state {
                        did = match instance.import_state(version, bytes) {
                            Ok(()) => match instance.export_state() {
                                Ok(exported) => format!(
                                    "imported {} bytes of state, exported {}, dropped",
                                    bytes.len(),
                                    exported.len()
                                ),
                                Err(error) => format!("export_state failed: {error}"),
                            },
                            Err(error) => format!("import_state refused the state: {error}"),
                        };
                    }
                    drop(instance);
                    did
                }
                Err(error) => format!("creating an instance failed: {error}"),
            };
            if let Ok(library) = Arc::try_unwrap(library) {
                let _ = library.close(&|_| false);
            }
            serde_json::json!({
                "service": manifest.name,
                "version": manifest.version.to_string(),
                "dependencies": manifest.dependencies,
                "instance": instance,
            })
        }
        Err(error) => serde_json::json!({ "refused": format!("{:#}", anyhow::Error::from(error)) }),
    }
}
