//! `microkernel run`: the daemon's main loop.
//!
//! The main loop never waits on plugin code, not even at start-up: the first scan runs on
//! the reload thread, and the control socket is served once it is done. The loop takes
//! [`Event`]s from signals, the control socket and the directory watcher, and hands reloads
//! to the reload thread, which owns the [`Reloader`] and applies every rescan, so rescans
//! never overlap; reload requests that arrive during a rescan are coalesced into one more
//! rescan. The loop's timer starts each service's checkpoint on a thread of its own (a busy
//! service holds back only its own), and closes the retired libraries that nothing runs in
//! any more. SIGINT and SIGTERM stop every service within `--operation-timeout`, saving every
//! state it can, and name the services that had to be abandoned.

use std::{
    fs,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{bail, Context};
use crossbeam_channel::{never, select, tick, unbounded, Receiver, Sender};
use nix::sys::signal::{SigSet, Signal};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};

use host::{
    loader::{threads, Probe},
    reload::{Reloader, ScanReport},
    state::{KeyRing, StateKey, StateStore},
    trust::Trust,
    Kernel, KernelConfig,
};

pub use crate::event::Event;
use crate::{
    cli::{KeyArgs, RunArgs},
    control::ControlServer,
};

/// How often retired libraries are tried again, and stuck instances that have ended are
/// forgotten.
const SWEEP_INTERVAL: Duration = Duration::from_secs(5);

/// The environment variable that may hold the state key (64 hex digits).
pub const KEY_ENV: &str = "MICROKERNEL_STATE_KEY";

/// Reads the current key (file, or environment) and the old keys.
pub fn key_ring(keys: &KeyArgs) -> anyhow::Result<KeyRing> {
    let current = match (&keys.key_file, std::env::var(KEY_ENV)) {
        (Some(path), _) => StateKey::from_file(path)?,
        (None, Ok(hex)) => {
            let hex = zeroize::Zeroizing::new(hex);
            StateKey::from_hex(&hex, &format!("environment variable {KEY_ENV}"))?
        }
        (None, Err(_)) => bail!(
            "no state key: pass --key-file FILE or set {KEY_ENV} (create a key with `microkernel keygen --out FILE`), or run with --no-state"
        ),
    };
    let old = keys
        .old_key_files
        .iter()
        .map(|path| StateKey::from_file(path))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(KeyRing::new(current, old))
}

/// The allocator arenas of the daemon (`MALLOC_ARENA_MAX` overrides it): one, measured best
/// on a 2-CPU machine for requests, swaps and memory alike; small allocations do not take
/// the arena's lock (glibc's per-thread cache), so a few busy threads do not contend.
pub const MALLOC_ARENAS: i32 = 1;

/// Runs the host until SIGINT or SIGTERM. Returns an error when the host could not start, or
/// when some state could not be saved at shutdown.
pub fn run(args: RunArgs) -> anyhow::Result<()> {
    // Handlers first, then the signals held since `main` began are let through: a SIGHUP
    // sent while the host starts is a rescan once the services are up, a SIGTERM a clean
    // stop; neither kills it.
    let signals = signal_hook::iterator::Signals::new([SIGHUP, SIGINT, SIGTERM])
        .context("installing signal handlers")?;
    release_signals();
    // A state write past a file-size limit fails with EFBIG, reported like ENOSPC, instead
    // of killing the host.
    signal_hook::flag::register(signal_hook::consts::SIGXFSZ, Default::default())
        .context("installing the SIGXFSZ handler")?;
    // Before any thread: a thread per instance must not mean an arena per thread.
    host::loader::limit_malloc_arenas(MALLOC_ARENAS);
    // This thread never runs plugin code on its own (see `loader::threads`).
    threads::adopt_current_thread();
    prepare_for_a_wedged_loader();
    if !args.plugins.is_dir() {
        bail!(
            "plugins directory {} does not exist or is not a directory",
            args.plugins.display()
        );
    }
    let trust = Trust {
        strict_modes: !args.allow_insecure_permissions,
        allow_list: args.allow_sha256.clone(),
    };
    trust.check("plugins directory", &args.plugins)?;
    trust.allow_list()?;
    // Keys first: a missing or unsafe key is the most common mistake, reported before
    // anything is created.
    let keys = if args.no_state {
        tracing::warn!("running with --no-state: service state is not persisted");
        None
    } else {
        Some(key_ring(&args.keys)?)
    };
    std::os::unix::fs::DirBuilderExt::mode(fs::DirBuilder::new().recursive(true), 0o700)
        .create(&args.state.dir)
        .with_context(|| format!("creating state directory {}", args.state.dir.display()))?;
    let _lock = lock_state_dir(&args.state.dir)?;
    let state = match keys {
        Some(keys) => {
            let store = StateStore::new(&args.state.dir, keys)?;
            // Only this host writes here (it holds the lock): a temporary file is what a
            // crash in the middle of a save left behind.
            for leftover in store.remove_leftovers() {
                tracing::info!(file = %leftover.display(), "removed a partial state write left by a crash");
            }
            Some(store)
        }
        None => None,
    };
    let _pid_file = args.pid_file.as_deref().map(PidFile::create).transpose()?;

    let kernel = Arc::new(Kernel::new(KernelConfig {
        mailbox_capacity: args.mailbox_capacity as usize,
        request_timeout: args.request_timeout,
        operation_timeout: args.operation_timeout,
        spin: args.spin,
        shadow_dir: args.shadow_dir.clone(),
        state,
        on_bad_state: args.on_bad_state.into(),
        probe: Some(Probe::new(Probe::this_program(), args.probe_timeout)),
    })?);

    let (events_tx, events) = unbounded();
    let signals = spawn_signal_thread(signals, events_tx.clone())?;
    let socket = args
        .socket
        .clone()
        .unwrap_or_else(|| args.state.default_socket());
    // Bound before anything starts (a bad socket path fails here), served once the services
    // are up: a client that connects early gets its answer from the running host.
    let mut control = ControlServer::bind(&socket)?;
    if let Some(addr) = args.metrics_listen {
        serve_metrics(addr, kernel.clone())?;
    }
    let checkpoints = if args.checkpoint_interval.is_zero() {
        never()
    } else {
        tick(args.checkpoint_interval)
    };
    // The first scan runs on the reload thread too: a plugin that hangs in `start` delays
    // the services, never a signal.
    let (started_tx, started) = crossbeam_channel::bounded(1);
    let reloader = Reloader::new(&args.plugins).with_trust(trust);
    let verdicts = reloader.verdicts();
    let reloads = spawn_reload_thread(kernel.clone(), reloader, started_tx)?;
    let mut up = || -> anyhow::Result<()> {
        let limits = crate::control::Limits {
            write: args.control_answer_timeout,
            ..crate::control::Limits::for_this_process()
        };
        control.serve_with(kernel.clone(), verdicts.clone(), events_tx.clone(), limits)?;
        if args.watch {
            spawn_watcher(args.plugins.clone(), events_tx.clone())?;
        }
        tracing::info!(
            plugins = %args.plugins.display(),
            services = kernel.list().len(),
            pid = std::process::id(),
            "host running: SIGHUP rescans, SIGINT/SIGTERM stop"
        );
        crate::notify::ready(&running_status(&kernel));
        Ok(())
    };
    let Stop {
        signal,
        up,
        failure,
    } = main_loop(&kernel, &reloads, &events, &checkpoints, &started, &mut up);
    let wedged = host::loader::loader_wedged();
    crate::notify::stopping(&format!("stopping every service ({signal})"));

    // Everything from here on is bounded: SIGTERM ends the host within the operation
    // timeout, plus the time to write the states that came back.
    let deadline = Instant::now() + args.operation_timeout;
    tracing::info!(signal, timeout = ?args.operation_timeout, "stopping every service");
    drop(control);
    signals.close();
    // A rescan under way finishes on its own; its service's stop waits for it until the
    // deadline.
    drop(reloads);
    if !up {
        // Stopped before the first scan was done (a SIGTERM during start-up): the services
        // it is starting are stopped once it is, within the same deadline.
        let _ = started.recv_deadline(deadline);
    }
    // The libraries stay loaded: the process ends with `_exit` (see `main`), so that no
    // plugin destructor runs (one that hangs would keep the host from ever exiting).
    let report = kernel.stop_for_exit(deadline);
    let _ = fs::remove_dir_all(kernel.loader().shadow_dir());
    if let Some(failure) = failure {
        return Err(failure.context(format!(
            "the host stopped ({}; every state that came back was saved)",
            stop_summary(&kernel, &report)
        )));
    }
    if wedged {
        bail!(
            "stopped because a plugin library's destructors hang in dlclose (see the log): the dynamic loader is blocked for good; restart the host"
        );
    }
    if report.failures.is_empty() {
        tracing::info!(
            stopped = report.stopped.len(),
            saved = kernel.state_store().is_some(),
            "all services stopped"
        );
        Ok(())
    } else {
        let abandoned = report.abandoned();
        if !abandoned.is_empty() {
            tracing::error!(
                services = %abandoned.join(", "),
                "abandoned: still in plugin code when the host stopped (a state exported before that was saved; see each service's error)"
            );
        }
        bail!("stopped, but {}", stop_summary(&kernel, &report))
    }
}

/// What is kept of a service's state after a stop that did not save it: the file written
/// last (a checkpoint, a hot replace), if any.
fn kept(kernel: &Kernel, service: &str) -> String {
    let Some(store) = kernel.state_store() else {
        return "state is not persisted".to_owned();
    };
    let path = store.path(service);
    match fs::metadata(&path).and_then(|m| m.modified()) {
        Ok(saved) => format!(
            "kept: {}, as saved at {}",
            path.display(),
            humantime::format_rfc3339_seconds(saved)
        ),
        Err(_) => format!("nothing kept: {} does not exist", path.display()),
    }
}

/// Why the main loop ended.
struct Stop {
    /// What asked for it (a signal's name).
    signal: &'static str,
    /// Whether the first scan was done.
    up: bool,
    /// A failure that ended the host (reported once every service is stopped).
    failure: Option<anyhow::Error>,
}

impl Stop {
    fn on(signal: &'static str, up: bool) -> Stop {
        Stop {
            signal,
            up,
            failure: None,
        }
    }
}

/// One line on how a stop went, for an error that ends the host.
fn stop_summary(kernel: &Kernel, report: &host::StopReport) -> String {
    if report.failures.is_empty() {
        format!("{} services stopped cleanly", report.stopped.len())
    } else {
        let failed: Vec<String> = report
            .failures
            .iter()
            .map(|(s, e)| format!("{s} ({}; {})", host::error_chain(e), kept(kernel, s)))
            .collect();
        format!(
            "these services failed to stop cleanly: {}",
            failed.join(", ")
        )
    }
}

fn main_loop(
    kernel: &Kernel,
    reloads: &Sender<Work>,
    events: &Receiver<Event>,
    checkpoints: &Receiver<Instant>,
    started: &Receiver<()>,
    up: &mut dyn FnMut() -> anyhow::Result<()>,
) -> Stop {
    let mut started = Some(started);
    let health = tick(Duration::from_millis(500));
    let mut state_dir_lost = false;
    let sweeps = tick(SWEEP_INTERVAL);
    loop {
        select! {
            recv(health) -> _ => {
                let moved = kernel.state_store().and_then(|store| Some((store.dir(), store.moved_to()?)));
                match (&moved, state_dir_lost) {
                    (Some((dir, now)), false) if now.to_string_lossy().ends_with(" (deleted)") => {
                        tracing::error!(dir = %dir.display(), "the state directory was deleted (or moved to another file system, which copies it and deletes it) while the host ran: no state can be saved from now on, and what changed since the last save is lost at exit; put the directory back and restart the host");
                    }
                    (Some((dir, now)), false) => {
                        tracing::error!(dir = %dir.display(), now = %now.display(), "the state directory was moved or renamed while the host ran: the host keeps saving in its own directory, where it is now, and writes nothing at the old path (another host may use it); restart the host to use the path again");
                    }
                    _ => {}
                }
                state_dir_lost = moved.is_some();
                if host::loader::loader_wedged() {
                    tracing::error!("a plugin library's destructors hang: saving every state and stopping, to be restarted");
                    return Stop::on("a wedged dynamic loader", started.is_none());
                }
            }
            recv(started.unwrap_or(&never())) -> _ => {
                // The first scan is done: the services are up.
                started = None;
                if let Err(failure) = up() {
                    // The services run: they are stopped, their states saved, before the
                    // host reports this and exits.
                    tracing::error!(error = format!("{failure:#}"), "the host could not start serving; stopping every service");
                    return Stop { signal: "a failure to serve", up: true, failure: Some(failure) };
                }
            }
            recv(events) -> event => match event {
                Ok(Event::Shutdown(signal)) => return Stop::on(signal, started.is_none()),
                Ok(Event::Reload { service, retry, reply }) => {
                    if reloads.send(Work::Reload(ReloadRequest { service, retry, reply })).is_err() {
                        tracing::error!("the reload thread is gone; reload not done");
                    }
                }
                Err(_) => return Stop::on("shutdown", started.is_none()),
            },
            recv(checkpoints) -> _ => kernel.checkpoint_in_background(),
            recv(sweeps) -> _ => {
                // Closing libraries runs their destructors: on the reload thread, too.
                let _ = reloads.send(Work::Sweep);
            }
        }
    }
}

/// The thread that applies rescans, one at a time, starting with the first one (then it
/// sends `started`); the reload requests waiting when one ends are served by one more.
fn spawn_reload_thread(
    kernel: Arc<Kernel>,
    mut reloader: Reloader,
    started: Sender<()>,
) -> anyhow::Result<Sender<Work>> {
    let (tx, rx) = unbounded::<Work>();
    threads::spawn_detached("reload", move || {
        reloader.scan(&kernel, None);
        let _ = started.send(());
        while let Ok(first) = rx.recv() {
            let mut sweep = false;
            let mut reloads = Vec::new();
            for work in std::iter::once(first).chain(rx.try_iter()) {
                match work {
                    Work::Sweep => sweep = true,
                    Work::Reload(request) => reloads.push(request),
                }
            }
            let mut reloads = reloads.into_iter();
            if let Some(first) = reloads.next() {
                let Batch {
                    only,
                    retry,
                    replies,
                } = Batch::of(first, reloads);
                crate::notify::reloading();
                let report = reloader.scan_with(&kernel, only.as_deref(), retry);
                let lines = report_lines(&report, only.as_deref(), &kernel);
                crate::notify::ready(&running_status(&kernel));
                for reply in replies {
                    let _ = reply.send(lines.clone());
                }
            }
            if sweep {
                kernel.sweep();
            }
        }
    })
    .context("starting the reload thread")?;
    Ok(tx)
}

/// Makes this thread use, once, the thread-locals with destructors that stopping the host
/// needs (a span's registration, a parked lock's thread data, a channel's context):
/// registering those destructors takes the dynamic loader's lock, which a plugin library
/// whose destructors hang in `dlclose` holds for good. Then this thread can still stop every
/// service and save their states (see `loader::loader_wedged`).
fn prepare_for_a_wedged_loader() {
    drop(tracing::info_span!("microkernel").entered());
    let lock = parking_lot::Mutex::new(());
    let held = lock.lock();
    drop(lock.try_lock_for(Duration::from_micros(1)));
    drop(held);
    let (tx, rx) = crossbeam_channel::bounded::<()>(0);
    let _ = rx.recv_timeout(Duration::from_micros(1));
    drop(tx);
}

/// Serves `kernel`'s metrics at `http://addr/metrics` on one thread of its own (bound here,
/// so that a bad address stops the host before any service starts). One connection at a
/// time, one request each, read for at most [`SCRAPE_TIMEOUT`] and [`SCRAPE_REQUEST_BYTES`],
/// answered and closed: a client that misbehaves costs a scrape some seconds, never a
/// thread, a descriptor past the listen backlog, or memory. (A general-purpose HTTP server
/// starts a thread per connection, which idle clients can pile up.)
fn serve_metrics(addr: std::net::SocketAddr, kernel: Arc<Kernel>) -> anyhow::Result<()> {
    let listener = std::net::TcpListener::bind(addr)
        .with_context(|| format!("binding the metrics address {addr}"))?;
    let bound = listener.local_addr().unwrap_or(addr);
    tracing::info!(addr = %bound, "metrics served at http://{bound}/metrics");
    threads::spawn_detached("metrics", move || {
        for stream in listener.incoming() {
            match stream {
                Ok(stream) => {
                    if let Err(error) = answer_scrape(stream, &kernel) {
                        tracing::debug!(%error, "metrics: a scrape failed");
                    }
                }
                Err(error) => {
                    // Out of descriptors, say: try again shortly rather than spin.
                    tracing::warn!(%error, "metrics: accepting a connection failed");
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
    })
    .context("starting the metrics thread")?;
    Ok(())
}

/// How long a metrics client has to send its request, and to read the answer.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(1);
/// The largest metrics request read (its request line and headers).
const SCRAPE_REQUEST_BYTES: usize = 8 * 1024;

/// Reads one HTTP request from `stream` and answers it: the metrics for `GET /metrics`
/// (OpenMetrics text, what prometheus-client writes), 404 or 405 otherwise.
fn answer_scrape(mut stream: std::net::TcpStream, kernel: &Kernel) -> std::io::Result<()> {
    use std::io::{Read, Write};
    stream.set_read_timeout(Some(SCRAPE_TIMEOUT))?;
    stream.set_write_timeout(Some(SCRAPE_TIMEOUT))?;
    let deadline = Instant::now() + SCRAPE_TIMEOUT;
    let mut request = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    let ended =
        |r: &[u8]| r.windows(4).any(|w| w == b"\r\n\r\n") || r.windows(2).any(|w| w == b"\n\n");
    while !ended(&request) {
        if request.len() > SCRAPE_REQUEST_BYTES || Instant::now() > deadline {
            return Err(std::io::Error::other(
                "no whole request in time or in 8 KiB",
            ));
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        request.extend_from_slice(&chunk[..n]);
    }
    let line = String::from_utf8_lossy(request.split(|&b| b == b'\n').next().unwrap_or_default());
    let mut words = line.split_whitespace();
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (status, kind, body) = match (method, path) {
        ("GET" | "HEAD", "/metrics") => (
            "200 OK",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            kernel.metrics_text(),
        ),
        ("GET" | "HEAD", _) => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "metrics are at /metrics\n".to_owned(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            "only GET /metrics\n".to_owned(),
        ),
    };
    let mut answer = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if method != "HEAD" {
        answer.extend_from_slice(body.as_bytes());
    }
    stream.write_all(&answer)?;
    let _ = stream.shutdown(std::net::Shutdown::Both);
    Ok(())
}

/// The `STATUS=` line told to the service manager: how many services run.
fn running_status(kernel: &Kernel) -> String {
    let services = kernel.list();
    let running = services
        .iter()
        .filter(|s| s.status == host::Status::Running)
        .count();
    format!("{running} of {} services running", services.len())
}

/// What the reload thread is asked to do.
#[derive(Debug)]
enum Work {
    /// A rescan.
    Reload(ReloadRequest),
    /// Close the retired libraries nothing runs in any more.
    Sweep,
}

/// A reload asked for, as the reload thread gets it.
#[derive(Debug)]
struct ReloadRequest {
    service: Option<String>,
    retry: bool,
    reply: Option<Sender<Vec<(String, bool)>>>,
}

/// What the reload requests waiting in the queue amount to: one rescan serves them all.
#[derive(Debug)]
struct Batch {
    /// The one service every request names, or `None` (a full rescan) when any names none
    /// or they differ.
    only: Option<String>,
    /// Whether any asks for the rejected files to be tried again.
    retry: bool,
    /// Where the outcome goes.
    replies: Vec<Sender<Vec<(String, bool)>>>,
}

impl Batch {
    fn of(first: ReloadRequest, rest: impl Iterator<Item = ReloadRequest>) -> Batch {
        let mut only: Option<Option<String>> = None;
        let mut replies = Vec::new();
        let mut retry = false;
        for ReloadRequest {
            service,
            retry: again,
            reply,
        } in std::iter::once(first).chain(rest)
        {
            retry |= again;
            only = match only {
                None => Some(service),
                Some(previous) if previous == service => Some(previous),
                Some(_) => Some(None),
            };
            replies.extend(reply);
        }
        Batch {
            only: only.flatten(),
            retry,
            replies,
        }
    }
}

/// What a rescan did, line by line (and whether each is an error); `only` is the service a
/// reload was limited to: its last line is about that service, not the whole directory.
fn report_lines(report: &ScanReport, only: Option<&str>, kernel: &Kernel) -> Vec<(String, bool)> {
    let mut lines = Vec::new();
    for service in &report.added {
        lines.push((format!("added {service}"), false));
    }
    for swap in &report.replaced {
        lines.push((
            format!(
                "replaced {} {} -> {} (requests held {:.2} ms)",
                swap.service,
                swap.from,
                swap.to,
                swap.held.as_secs_f64() * 1e3
            ),
            false,
        ));
    }
    for service in &report.restarted {
        lines.push((format!("started {service}"), false));
    }
    for line in &report.fell_back {
        lines.push((line.clone(), false));
    }
    for error in &report.errors {
        lines.push((host::error_chain(error), true));
    }
    match only {
        Some(service) if lines.is_empty() => {
            let line = match kernel.info(service) {
                Some(info) => format!(
                    "{service} unchanged: {} {} from {}",
                    info.version,
                    info.status,
                    info.path.display()
                ),
                None => format!("{service} unchanged"),
            };
            lines.push((line, false));
        }
        Some(_) => {}
        None => {
            let files = if report.unchanged == 1 {
                "file"
            } else {
                "files"
            };
            lines.push((format!("{} {files} unchanged", report.unchanged), false));
        }
    }
    lines
}

/// The signals the daemon handles.
const HANDLED: [Signal; 3] = [Signal::SIGHUP, Signal::SIGINT, Signal::SIGTERM];

fn handled() -> SigSet {
    let mut set = SigSet::empty();
    for signal in HANDLED {
        set.add(signal);
    }
    set
}

/// Holds SIGHUP, SIGINT and SIGTERM on the calling thread (call it first in `main`, before
/// any thread exists): until [`release_signals`], they stay pending instead of killing the
/// process.
pub fn hold_signals() {
    let _ = handled().thread_block();
}

/// Lets SIGHUP, SIGINT and SIGTERM through again on the calling thread (and the threads it
/// starts from now on).
pub fn release_signals() {
    let _ = handled().thread_unblock();
}

fn spawn_signal_thread(
    mut signals: signal_hook::iterator::Signals,
    events: Sender<Event>,
) -> anyhow::Result<signal_hook::iterator::Handle> {
    let handle = signals.handle();
    threads::spawn_detached("signals", move || {
        for signal in signals.forever() {
            let event = match signal {
                SIGHUP => {
                    tracing::info!("SIGHUP: rescanning the plugins directory");
                    Event::Reload {
                        service: None,
                        retry: false,
                        reply: None,
                    }
                }
                SIGINT => Event::Shutdown("SIGINT"),
                _ => Event::Shutdown("SIGTERM"),
            };
            if events.send(event).is_err() {
                return;
            }
        }
    })
    .context("starting the signal thread")?;
    Ok(handle)
}

/// Polls the plugins directory; after a change, waits until it has been quiet for the
/// debounce period, then asks for a rescan.
fn spawn_watcher(dir: PathBuf, events: Sender<Event>) -> anyhow::Result<()> {
    const POLL: Duration = Duration::from_millis(250);
    const QUIET: Duration = Duration::from_millis(500);
    threads::spawn_detached("watch", move || {
        let mut seen = snapshot(&dir);
        let mut changed_at: Option<Instant> = None;
        loop {
            std::thread::sleep(POLL);
            let now = snapshot(&dir);
            if now != seen {
                seen = now;
                changed_at = Some(Instant::now());
            } else if changed_at.is_some_and(|at| at.elapsed() >= QUIET) {
                changed_at = None;
                tracing::info!(dir = %dir.display(), "plugins changed: rescanning");
                if events
                    .send(Event::Reload {
                        service: None,
                        retry: false,
                        reply: None,
                    })
                    .is_err()
                {
                    return;
                }
            }
        }
    })
    .context("starting the watcher")?;
    Ok(())
}

fn snapshot(dir: &Path) -> Vec<(PathBuf, u64, Option<SystemTime>)> {
    let mut files: Vec<_> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "so"))
        .filter_map(|e| {
            let meta = e.metadata().ok()?;
            Some((e.path(), meta.len(), meta.modified().ok()))
        })
        .collect();
    files.sort();
    files
}

/// Makes sure no other host uses the same state directory (two hosts would overwrite each
/// other's state). The lock is held until the returned file is dropped.
fn lock_state_dir(dir: &Path) -> anyhow::Result<nix::fcntl::Flock<fs::File>> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(".lock");
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("opening lock file {}", path.display()))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(
        |(_, errno)| {
            anyhow::anyhow!(
                "state directory {} is in use by another host ({errno})",
                dir.display()
            )
        },
    )
}

/// A PID file, removed when dropped.
#[derive(Debug)]
struct PidFile(PathBuf);

impl PidFile {
    fn create(path: &Path) -> anyhow::Result<Self> {
        if let Ok(text) = fs::read_to_string(path) {
            if let Ok(pid) = text.trim().parse::<i32>() {
                let alive = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok();
                if alive && pid != std::process::id() as i32 {
                    bail!("PID file {} names process {pid}, which is running: is another host using it?", path.display());
                }
            }
        }
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let mut file = tempfile::NamedTempFile::new_in(dir)
            .with_context(|| format!("writing PID file {}", path.display()))?;
        std::io::Write::write_all(&mut file, format!("{}\n", std::process::id()).as_bytes())?;
        file.persist(path)
            .with_context(|| format!("writing PID file {}", path.display()))?;
        Ok(PidFile(path.to_owned()))
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        // Only our own: another host may have written its PID there since.
        let ours = fs::read_to_string(&self.0)
            .is_ok_and(|text| text.trim() == std::process::id().to_string());
        if ours {
            let _ = fs::remove_file(&self.0);
        }
    }
}

/// `microkernel reload --pid-file`: sends SIGHUP to the host named in the PID file.
pub fn signal_reload(pid_file: &Path) -> anyhow::Result<i32> {
    let text = fs::read_to_string(pid_file).with_context(|| {
        format!(
            "reading PID file {} (is the host running with --pid-file?)",
            pid_file.display()
        )
    })?;
    let pid: i32 = text.trim().parse().with_context(|| {
        format!(
            "PID file {} does not hold a process id: {:?}",
            pid_file.display(),
            text.trim()
        )
    })?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGHUP,
    )
    .with_context(|| {
        format!(
            "sending SIGHUP to process {pid} from {}",
            pid_file.display()
        )
    })?;
    Ok(pid)
}

#[cfg(test)]
mod tests {
    use super::{Batch, ReloadRequest};

    fn reload(service: Option<&str>) -> ReloadRequest {
        ReloadRequest {
            service: service.map(str::to_owned),
            retry: false,
            reply: None,
        }
    }

    #[test]
    fn reloads_waiting_together_become_one_rescan() {
        let events = vec![reload(Some("echo")), reload(Some("echo"))];
        assert_eq!(
            Batch::of(reload(Some("echo")), events.into_iter()).only,
            Some("echo".into())
        );
        let mixed = vec![reload(Some("kv"))];
        assert_eq!(
            Batch::of(reload(Some("echo")), mixed.into_iter()).only,
            None
        );
        let full = vec![reload(Some("echo"))];
        assert_eq!(Batch::of(reload(None), full.into_iter()).only, None);
    }
}
