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
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use crossbeam_channel::{never, select, tick, unbounded, Receiver, Sender};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};

use host::{
    loader::{threads, Probe},
    reload::Reloader,
    state::{KeyRing, StateKey, StateStore},
    trust::Trust,
    Kernel, KernelConfig,
};

pub use crate::event::Event;
use crate::{
    cli::{KeyArgs, RunArgs},
    control::ControlServer,
};

mod files;
mod metrics;
mod reload;
mod signals;
mod watch;

pub use files::signal_reload;
use files::{lock_state_dir, PidFile};
use metrics::serve_metrics;
use reload::{spawn_reload_thread, ReloadRequest, Work};
use signals::spawn_signal_thread;
pub use signals::{hold_signals, release_signals};
use watch::spawn_watcher;

/// How often retired libraries are tried again, and stuck instances that have ended are
/// forgotten.
const SWEEP_INTERVAL: Duration = Duration::from_secs(5);

/// The environment variable that may hold the state key (64 hex digits).
pub const KEY_ENV: &str = host::state::KEY_VARIABLE;

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
pub fn run(
    args: RunArgs,
    config_file: Option<(std::path::PathBuf, crate::config::FileConfig)>,
) -> anyhow::Result<()> {
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
    // A plugin that crashes the process, or calls `exit`, leaves a line naming it.
    host::loader::report_fatal_ends().context("installing the fatal-signal reporter")?;
    let plugins = args
        .plugins
        .clone()
        .context("no plugins directory: give --plugins, or `plugins` in the configuration file")?;
    if !plugins.is_dir() {
        bail!(
            "plugins directory {} does not exist or is not a directory",
            plugins.display()
        );
    }
    let trust = Trust {
        strict_modes: !args.allow_insecure_permissions,
        allow_list: args.allow_sha256.clone(),
    };
    trust.check("plugins directory", &plugins)?;
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
    // Whoever can write it can take over the control socket and the services' state.
    trust.check("state directory", &args.state.dir)?;
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
    // In a fleet, states live in etcd, sealed with the same key (which never leaves the
    // host), and this host runs the services it owns.
    let fleet = match crate::config::fleet_config(&args).map_err(anyhow::Error::msg)? {
        Some(config) => {
            let keys = state
                .as_ref()
                .map(|store| store.keys().clone())
                .context("a fleet keeps state in etcd: it needs the state key")?;
            let joined = fleet::Fleet::join(&config, keys).map_err(|error| {
                let hint = if host::error_chain(&error).contains("user name is empty") {
                    " (etcd has authentication on: give --etcd-user and --etcd-password-file)"
                } else {
                    ""
                };
                anyhow::Error::new(error).context(format!(
                    "joining the fleet on {} as node `{}`{hint}",
                    config.endpoints.describe(),
                    config.node
                ))
            })?;
            Some(joined)
        }
        None => None,
    };

    let kernel = Arc::new(Kernel::new(KernelConfig {
        mailbox_capacity: args.mailbox_capacity as usize,
        request_timeout: args.request_timeout,
        operation_timeout: args.operation_timeout,
        spin: args.spin,
        shadow_dir: args.shadow_dir.clone(),
        state,
        on_bad_state: args.on_bad_state.into(),
        probe: Some(Probe::new(Probe::this_program(), args.probe_timeout)),
        isolation: config_file
            .as_ref()
            .map(|(_, file)| crate::config::isolation(file, args.operation_timeout))
            .unwrap_or_default(),
        worker_program: None,
        state_backend: fleet
            .clone()
            .map(|fleet| fleet as Arc<dyn host::state::StateBackend>),
        placement: fleet
            .clone()
            .map(|fleet| fleet as Arc<dyn host::kernel::Placement>),
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
    if let Some(fleet) = &fleet {
        control.set_fleet(fleet.clone());
    }
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
    // SAFETY: the operator names the plugins directory (`--plugins`), and so vouches for
    // the files in it that pass the trust checks (README, "Trust").
    let reloader = unsafe { Reloader::new(&plugins) }.with_trust(trust);
    let verdicts = reloader.verdicts();
    let reloads = spawn_reload_thread(kernel.clone(), reloader, config_file, started_tx)?;
    let mut member = fleet
        .clone()
        .map(|fleet| fleet::Member::spawn(fleet, kernel.clone()))
        .transpose()
        .context("starting the fleet's placement thread")?;
    let mut up = || -> anyhow::Result<()> {
        let limits = crate::control::Limits {
            write: args.control_answer_timeout,
            ..crate::control::Limits::for_this_process()
        };
        control.serve_with(kernel.clone(), verdicts.clone(), events_tx.clone(), limits)?;
        if args.watch {
            spawn_watcher(plugins.clone(), events_tx.clone())?;
        }
        tracing::info!(
            plugins = %plugins.display(),
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
    // No service is taken any more; those this host owns are saved as they stop, and the
    // lease revoked after, so that the others take them at once.
    if let Some(member) = member.as_mut() {
        member.stop(deadline);
    }
    let report = kernel.stop_for_exit(deadline);
    if let Some(fleet) = &fleet {
        fleet.leave();
    }
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

/// The `STATUS=` line told to the service manager: how many services run.
fn running_status(kernel: &Kernel) -> String {
    let services = kernel.list();
    let running = services
        .iter()
        .filter(|s| s.status == host::Status::Running)
        .count();
    format!("{running} of {} services running", services.len())
}
