//! Shared test support: the plugin fixtures (built once per test run), plugin directories,
//! kernels, and a capture of every log line.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::{Mutex, OnceLock},
};

use host::{Kernel, KernelConfig};
use tracing_subscriber::{layer::SubscriberExt, util::SubscriberInitExt, Layer};

pub type TestResult = Result<(), Box<dyn std::error::Error>>;

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// The target directory of this test run (fixtures are built into it too).
pub fn target_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// Every plugin crate the tests load, by package name.
const PACKAGES: &[&str] = &[
    "echo",
    "echo-v2",
    "logger",
    "kv",
    "fixture-echo-faulty",
    "fixture-relay",
    "fixture-bad-name",
    "fixture-cycle-a",
    "fixture-cycle-b",
    "fixture-echo-needs-kv",
    "fixture-faulty",
    "fixture-faulty-v2",
    "fixture-tokio",
    "fixture-origin",
];

/// Workspaces under `tests/fixtures-isolated` (see the README there).
const ISOLATED: &[&str] = &["old-abi", "old-sdk", "abi-mismatch"];

/// A `cargo` command without the variables of the cargo that runs the tests, so that the
/// nested build behaves like one from a shell.
pub fn cargo() -> Command {
    let mut command = Command::new(env!("CARGO"));
    without_cargo_env(&mut command);
    command.arg("--quiet").arg("--color=never");
    command
}

/// Removes from `command` the variables of the cargo that runs the tests (a script that
/// runs cargo then behaves as from a shell).
pub fn without_cargo_env(command: &mut Command) {
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if key.starts_with("CARGO_") && key != "CARGO_HOME" || key == "RUSTFLAGS" {
            command.env_remove(&*key);
        }
    }
}

fn run(mut command: Command) {
    let output = command.output().expect("cargo runs");
    assert!(
        output.status.success(),
        "{command:?} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Marks the calling thread (a test's, or one a test starts) as the host's: it runs no plugin
/// code of its own, so it must not keep libraries loaded (see `host::loader::threads`).
/// Every support function that a test starts with calls it.
pub fn adopt() {
    thread_local! {
        static ADOPTED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }
    if !ADOPTED.with(|a| a.replace(true)) {
        host::loader::threads::adopt_current_thread();
    }
}

/// Builds every fixture once per test run; returns the directory holding the `.so` files.
pub fn fixture_dir() -> &'static Path {
    adopt();
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        // Built already by the run that started this one (the isolated pass).
        if let Some(built) = std::env::var_os("MICROKERNEL_TEST_FIXTURES") {
            return PathBuf::from(built);
        }
        let target = target_dir();
        let mut build = cargo();
        build
            .current_dir(workspace())
            .arg("build")
            .arg("--target-dir")
            .arg(&target);
        for package in PACKAGES {
            build.args(["-p", package]);
        }
        run(build);
        for isolated in ISOLATED {
            let mut build = cargo();
            build
                .current_dir(workspace().join("tests/fixtures-isolated").join(isolated))
                .args(["build", "--target-dir"])
                .arg(&target);
            run(build);
        }
        target.join("debug")
    })
}

/// The built `.so` of a plugin package.
pub fn fixture(package: &str) -> PathBuf {
    fixture_dir().join(format!("lib{}.so", package.replace('-', "_")))
}

/// A fresh plugins directory holding copies of the given packages' libraries.
pub fn plugin_dir(packages: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for package in packages {
        add_plugin(dir.path(), package);
    }
    dir
}

/// Copies a package's library into `dir`, returns its path there.
pub fn add_plugin(dir: &Path, package: &str) -> PathBuf {
    let source = fixture(package);
    let target = dir.join(source.file_name().unwrap());
    std::fs::copy(&source, &target).unwrap();
    target
}

/// A kernel with default settings and no state (in the suite's mode, see [`in_mode`]).
pub fn kernel() -> Kernel {
    adopt();
    capture_logs();
    Kernel::new(in_mode(KernelConfig::default())).unwrap()
}

/// The services of the suite's plugins and fixtures.
const SERVICES: &[&str] = &[
    "echo", "kv", "logger", "noop", "faulty", "relay", "tokio", "origin", "named", "cycle-a",
    "cycle-b",
];

/// Whether the suite runs its services isolated: `MICROKERNEL_TEST_MODE=isolated` (what
/// `.ci/run` does for a second pass over the behaviour that does not depend on the mode).
pub fn isolated_mode() -> bool {
    std::env::var("MICROKERNEL_TEST_MODE").is_ok_and(|mode| mode == "isolated")
}

/// Ends a test that holds only in process (it counts libraries opened in the host, or
/// expects an instance stuck in plugin code, which a worker that does not answer never is:
/// it is killed): its isolated counterpart is in `isolation.rs`.
#[macro_export]
macro_rules! in_process_only {
    () => {
        if $crate::support::isolated_mode() {
            eprintln!("in process only: skipped in the isolated pass");
            return Ok(());
        }
    };
}

/// `config` in the suite's mode: in-process by default; with every service of the suite
/// isolated when [`isolated_mode`].
pub fn in_mode(config: KernelConfig) -> KernelConfig {
    if !isolated_mode() {
        return config;
    }
    KernelConfig {
        isolation: SERVICES
            .iter()
            .map(|s| ((*s).to_owned(), host::worker::Isolation::default()))
            .collect(),
        worker_program: Some(PathBuf::from(env!("CARGO_BIN_EXE_microkernel"))),
        ..config
    }
}

/// A log line seen by the subscriber.
#[derive(Debug, Clone)]
pub struct LogLine {
    pub target: String,
    pub level: tracing::Level,
    pub service: Option<String>,
    /// A plugin's line: the target it logged with.
    pub module: Option<String>,
    pub message: String,
}

static LINES: Mutex<Vec<LogLine>> = Mutex::new(Vec::new());

struct Capture;

#[derive(Default)]
struct Fields {
    service: Option<String>,
    module: Option<String>,
    message: String,
}

impl tracing::field::Visit for Fields {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        match field.name() {
            "service" => self.service = Some(value.to_owned()),
            "module" => self.module = Some(value.to_owned()),
            "message" => self.message = value.to_owned(),
            _ => {}
        }
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        match field.name() {
            "service" => self.service = Some(format!("{value:?}")),
            "module" => self.module = Some(format!("{value:?}")),
            "message" => self.message = format!("{value:?}"),
            _ => {}
        }
    }
}

impl<S: tracing::Subscriber> Layer<S> for Capture {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        let mut fields = Fields::default();
        event.record(&mut fields);
        LINES.lock().unwrap().push(LogLine {
            target: event.metadata().target().to_owned(),
            level: *event.metadata().level(),
            service: fields.service,
            module: fields.module,
            message: fields.message,
        });
    }
}

/// Installs the process-wide subscriber (once): captures every line, prints with the test
/// writer when `RUST_LOG` is set.
pub fn capture_logs() {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        let print = std::env::var_os("RUST_LOG").map(|_| {
            tracing_subscriber::fmt::layer()
                .with_test_writer()
                .with_filter(tracing_subscriber::EnvFilter::from_default_env())
        });
        tracing_subscriber::registry()
            .with(Capture)
            .with(print)
            .init();
    });
}

/// Every captured line so far matching `predicate`.
pub fn logged(predicate: impl Fn(&LogLine) -> bool) -> Vec<LogLine> {
    LINES
        .lock()
        .unwrap()
        .iter()
        .filter(|l| predicate(l))
        .cloned()
        .collect()
}

/// A unique token for a test to look for in shared output.
pub fn token(label: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "{label}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// The reply data of a request as JSON, after asserting success.
pub fn json(reply: &plugin_api::Reply) -> serde_json::Value {
    assert!(reply.is_ok(), "expected success, got {reply}");
    serde_json::from_slice(&reply.data).unwrap()
}

/// A state directory and a key, kept for the life of a test, to build kernels that persist.
pub struct Persisted {
    pub dir: tempfile::TempDir,
    pub key_hex: String,
}

impl Persisted {
    pub fn new() -> Self {
        adopt();
        Persisted {
            dir: tempfile::tempdir().unwrap(),
            key_hex: hex_key(),
        }
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn state_file(&self, service: &str) -> PathBuf {
        self.state_dir().join(format!("{service}.state"))
    }

    pub fn config(&self, policy: host::BadStatePolicy) -> KernelConfig {
        self.config_with_key(&self.key_hex, policy)
    }

    pub fn config_with_key(&self, key_hex: &str, policy: host::BadStatePolicy) -> KernelConfig {
        self.config_with_keys(key_hex, &[], policy)
    }

    /// A configuration that seals with `current` and also opens files sealed with `old`.
    pub fn config_with_keys(
        &self,
        current: &str,
        old: &[&str],
        policy: host::BadStatePolicy,
    ) -> KernelConfig {
        let key = |hex: &str| host::state::StateKey::from_hex(hex, "test").unwrap();
        let keys =
            host::state::KeyRing::new(key(current), old.iter().map(|hex| key(hex)).collect());
        in_mode(KernelConfig {
            state: Some(host::state::StateStore::new(&self.state_dir(), keys).unwrap()),
            on_bad_state: policy,
            ..Default::default()
        })
    }

    /// A kernel persisting here, running what `plugins` holds.
    pub fn kernel(&self, plugins: &Path) -> (Kernel, host::reload::ScanReport) {
        self.kernel_with(plugins, self.config(host::BadStatePolicy::Refuse))
    }

    pub fn kernel_with(
        &self,
        plugins: &Path,
        config: KernelConfig,
    ) -> (Kernel, host::reload::ScanReport) {
        capture_logs();
        let kernel = Kernel::new(config).unwrap();
        let report = reloader_of(plugins).scan(&kernel, None);
        (kernel, report)
    }
}

/// A random key, hex.
pub fn hex_key() -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k");
    host::state::StateKey::write_new(&path).unwrap();
    std::fs::read_to_string(path).unwrap().trim().to_owned()
}

/// The count in an echo reply.
pub fn echo_count(kernel: &Kernel) -> u64 {
    json(&kernel.request("echo", "echo", b"", None))["count"]
        .as_u64()
        .unwrap()
}

/// Keeps `service` (a fixture with a `sleep` request) busy for `ms`: the request is queued
/// before this returns, so whatever is sent or posted to the service afterwards is behind
/// it, however slow the machine. The reply comes on the returned thread.
pub fn busy_for(
    kernel: &Kernel,
    service: &str,
    ms: u64,
) -> std::thread::JoinHandle<plugin_api::Reply> {
    let pending = kernel
        .post_request(
            service,
            "sleep",
            ms.to_string().as_bytes(),
            Some(std::time::Duration::from_secs(20)),
            std::time::Duration::from_secs(5),
        )
        .unwrap_or_else(|refused| panic!("the sleep was not queued: {refused}"));
    std::thread::spawn(move || {
        adopt();
        let got = pending.rx.recv_deadline(pending.deadline);
        pending.reply(got)
    })
}

/// Blocks until `service` (an echo-faulty fixture) is busy in a request queued before
/// (see [`busy_for`]): a probe that does nothing times out. Panics after 10 seconds.
pub fn wait_until_busy(kernel: &Kernel, service: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let probe = kernel.request(
            service,
            "sleep",
            b"0",
            Some(std::time::Duration::from_millis(20)),
        );
        if probe.code == plugin_api::codes::TIMEOUT {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{service} never got busy"
        );
    }
}

/// Whether every library `kernel` retired gets closed within 10 s. A library is kept while a
/// thread the host does not know is alive (see `host::loader::threads`); in this test binary
/// that can be another test's thread that has not adopted itself yet, for a moment.
pub fn all_closed_soon(kernel: &Kernel) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while kernel.sweep() > 0 {
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    true
}

/// Loads a plugin file: the suite's one place that vouches for a library (see
/// `Loader::load`). The suite loads only the plugins and fixtures of this repository, built
/// by the suite, and files its tests made on purpose to be refused before they are opened.
pub fn load(
    loader: &host::loader::Loader,
    path: &Path,
) -> Result<host::loader::Library, host::loader::LoadError> {
    // SAFETY: see above.
    unsafe { loader.load(path) }
}

/// [`load`] of a file already read.
pub fn load_file(
    loader: &host::loader::Loader,
    file: &host::loader::PluginFile,
) -> Result<host::loader::Library, host::loader::LoadError> {
    // SAFETY: as in `load`.
    unsafe { loader.load_file(file) }
}

/// `Kernel::load` (see [`load`]).
#[expect(
    clippy::result_large_err,
    reason = "the kernel's own error, passed on as it is"
)]
pub fn load_into(
    kernel: &Kernel,
    path: &Path,
    config: Option<String>,
) -> Result<String, host::KernelError> {
    // SAFETY: as in `load`.
    unsafe { kernel.load(path, config) }
}

/// A reloader of a plugins directory the suite made (see [`load`]).
pub fn reloader_of(dir: &Path) -> host::reload::Reloader {
    // SAFETY: as in `load`.
    unsafe { host::reload::Reloader::new(dir) }
}
