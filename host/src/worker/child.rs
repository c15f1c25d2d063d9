//! The worker process: `microkernel worker FILE --as PATH` (hidden), started by the host
//! for one isolated service. It opens the plugin file, creates the one instance, and runs
//! the calls the host sends until it is told to exit or its socket closes.
//!
//! What it starts with: the call socket as standard input, the side socket as standard
//! output (see [`super::protocol`]), standard error shared with the host. It takes both
//! sockets off those descriptors at once (standard input becomes `/dev/null`, standard output
//! a copy of standard error, so that a plugin's `println!` goes to the host's log stream)
//! and closes every other descriptor it inherited. It never sees the state key, the state
//! directory or another service's state: only what the host sends it on its socket.

use std::{
    cell::Cell,
    io,
    os::{fd::AsRawFd, unix::net::UnixStream},
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use plugin_api::{abi::LogLevel, codes, Reply};

use super::protocol::{Conn, FromWorker, ToWorker, WireError, WireManifest, WireReply};
use crate::{
    instance::{HostServices, Message, ServiceInstance},
    loader::{self, Instance},
};

/// The status of a worker that could not take its sockets or lost its host before it
/// opened anything: the host's trouble, never the file's.
pub const EXIT_NO_HOST: i32 = 3;

/// How long the worker polls its socket for the next call before it sleeps.
pub(super) const SPIN: Duration = Duration::from_micros(100);

thread_local! {
    /// Set on the worker's main thread while the plugin runs a call there: its callbacks
    /// then go on the call socket, which the host reads while it waits for the outcome.
    static IN_CALL: Cell<bool> = const { Cell::new(false) };
}

type Shared = Arc<Mutex<Conn>>;

fn lock(conn: &Shared) -> std::sync::MutexGuard<'_, Conn> {
    conn.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs the worker and ends the process: with status 0 once told to exit (or once its host
/// is gone), [`EXIT_NO_HOST`] when it could not take its sockets. It ends without running
/// anything registered at exit (the plugin library's destructors are plugin code, and
/// nothing is left to save).
pub fn run_worker_child(file: &Path, name: &Path, service: Option<&str>, limits: &Limits) -> ! {
    let code = run(file, name, service, limits);
    loader::exit_without_destructors(code)
}

/// What a worker is limited to (see [`super::Isolation`]).
#[derive(Debug, Clone, Default)]
pub struct Limits {
    /// Its address-space limit (`RLIMIT_AS`), in bytes.
    pub memory_max: Option<u64>,
    /// Confine it with Landlock to reading its plugin file and the system's libraries.
    pub landlock: bool,
}

fn run(file: &Path, name: &Path, service: Option<&str>, limits: &Limits) -> i32 {
    let parent = std::env::var("MICROKERNEL_WORKER_PARENT").ok();
    // Dies with the thread that started it (see `spawn`); a parent already gone before
    // this line leaves no one to serve.
    let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL);
    if parent.is_some_and(|p| p != nix::unistd::getppid().to_string()) {
        return EXIT_NO_HOST;
    }
    let (call, side) = match take_sockets() {
        Ok(sockets) => sockets,
        Err(error) => {
            eprintln!("microkernel worker: cannot take its sockets: {error}");
            return EXIT_NO_HOST;
        }
    };
    // Named in its last words: the service, or (reading a file's manifest) the file.
    match service {
        Some(service) => crate::last_words::on_executor(service),
        None => crate::last_words::on_executor(&name.display().to_string()),
    }
    // Few arenas: each reserves 64 MiB of address space, which a limit counts in full.
    loader::limit_malloc_arenas(2);
    if let Some(bytes) = limits.memory_max {
        use nix::sys::resource::{setrlimit, Resource};
        if let Err(error) = setrlimit(Resource::RLIMIT_AS, bytes, bytes) {
            eprintln!(
                "microkernel worker: cannot limit its address space to {bytes} bytes: {error}"
            );
            return EXIT_NO_HOST;
        }
    }
    let _ = loader::report_fatal_signals_in_worker();
    let call: Shared = Arc::new(Mutex::new(call));
    let side: Shared = Arc::new(Mutex::new(side));
    // Confined before any plugin code runs (the file's initializers run when it opens).
    let confined = limits.landlock.then(|| confine(file));
    let ready = FromWorker::Ready {
        confined: confined.as_deref(),
    };
    if lock(&call).send(&ready, None).is_err() {
        return EXIT_NO_HOST;
    }
    // The file is opened before anything else: a worker is also the probe of its file.
    let library = match in_call("open", || loader::open_for_worker(name, file)) {
        Ok(library) => Arc::new(library),
        Err(error) => {
            let error = format!("{:#}", anyhow::Error::from(error));
            let _ = lock(&call).send(&FromWorker::Opened(Err(&error)), None);
            return 0;
        }
    };
    let manifest = library.manifest().clone();
    let version = manifest.version.to_string();
    let wire = WireManifest {
        name: &manifest.name,
        version: &version,
        dependencies: manifest.dependencies.iter().map(String::as_str).collect(),
    };
    if lock(&call)
        .send(&FromWorker::Opened(Ok(wire)), None)
        .is_err()
    {
        return 0;
    }
    // The host sends the configuration, or `Exit` when it only wanted the manifest.
    let created = {
        let mut conn = lock(&call);
        let config = match conn.recv::<ToWorker>(SPIN, None) {
            Ok(ToWorker::Create { config }) => Ok(config.map(str::to_owned)),
            Ok(_) | Err(_) => Err(()),
        };
        drop(conn);
        let Ok(config) = config else {
            // Told to exit (or the host went): nothing of the plugin was created.
            return 0;
        };
        let services: Arc<dyn HostServices> = Arc::new(WorkerServices {
            call: call.clone(),
            side,
        });
        in_call("new", || {
            Instance::new(library.clone(), services, config.as_deref())
        })
    };
    let mut instance = match created {
        Ok(instance) => instance,
        Err(error) => {
            let _ = lock(&call).send(&FromWorker::Created(Err(&error)), None);
            return 0;
        }
    };
    if lock(&call)
        .send(&FromWorker::Created(Ok(())), None)
        .is_err()
    {
        return 0;
    }
    serve(&call, &manifest.name, &mut instance);
    in_call("drop", || drop(instance));
    // Not closed: the process ends now, and threads the plugin started may still run its
    // code (closing would only warn about them).
    std::mem::forget(library);
    0
}

/// Runs `f` as a call into the plugin on this thread.
fn in_call<T>(call: &'static str, f: impl FnOnce() -> T) -> T {
    crate::last_words::in_call(call);
    IN_CALL.with(|c| c.set(true));
    let result = f();
    IN_CALL.with(|c| c.set(false));
    crate::last_words::in_call("");
    result
}

fn serve(call: &Shared, service: &str, instance: &mut Instance) {
    loop {
        // Owned copies: the plugin's callbacks read answers into the same buffer.
        let next = {
            let mut conn = lock(call);
            match conn.recv::<ToWorker>(SPIN, None) {
                Ok(message) => Owned::of(message),
                Err(_) => return,
            }
        };
        let sent = match next {
            Owned::Start => {
                let done = in_call("start", || instance.start());
                lock(call).send(
                    &FromWorker::Done(done.as_ref().map(|_| ()).map_err(|e| &**e)),
                    None,
                )
            }
            Owned::Stop => {
                let done = in_call("stop", || instance.stop());
                lock(call).send(
                    &FromWorker::Done(done.as_ref().map(|_| ()).map_err(|e| &**e)),
                    None,
                )
            }
            Owned::Handle {
                from,
                kind,
                payload,
            } => {
                let reply = in_call("handle", || {
                    instance.handle(Message {
                        from: &from,
                        to: service,
                        kind: &kind,
                        payload: &payload,
                    })
                });
                lock(call).send(&FromWorker::Replied(WireReply::of(&reply)), None)
            }
            Owned::Event {
                from,
                kind,
                payload,
            } => {
                let done = in_call("on_event", || {
                    instance.on_event(Message {
                        from: &from,
                        to: service,
                        kind: &kind,
                        payload: &payload,
                    })
                });
                lock(call).send(
                    &FromWorker::Done(done.as_ref().map(|_| ()).map_err(|e| &**e)),
                    None,
                )
            }
            Owned::Export => {
                let exported = in_call("export_state", || instance.export_state());
                let wire = exported.as_deref().map_err(|e| &**e);
                lock(call).send(&FromWorker::Exported(wire), None)
            }
            Owned::Import {
                from_version,
                state,
            } => {
                let done = in_call("import_state", || {
                    instance.import_state(&from_version, &state)
                });
                drop(state);
                lock(call).send(
                    &FromWorker::Done(done.as_ref().map(|_| ()).map_err(|e| &**e)),
                    None,
                )
            }
            Owned::Exit => return,
            Owned::Stray => Ok(()),
        };
        if sent.is_err() {
            return;
        }
    }
}

/// A call, copied out of its frame.
enum Owned {
    Start,
    Stop,
    Handle {
        from: String,
        kind: String,
        payload: Vec<u8>,
    },
    Event {
        from: String,
        kind: String,
        payload: Vec<u8>,
    },
    Export,
    Import {
        from_version: String,
        state: Vec<u8>,
    },
    Exit,
    /// An answer to no callback, or a second `Create`: ignored.
    Stray,
}

impl Owned {
    fn of(message: ToWorker<'_>) -> Owned {
        match message {
            ToWorker::Start => Owned::Start,
            ToWorker::Stop => Owned::Stop,
            ToWorker::Handle {
                from,
                kind,
                payload,
            } => Owned::Handle {
                from: from.to_owned(),
                kind: kind.to_owned(),
                payload: payload.to_vec(),
            },
            ToWorker::Event {
                from,
                kind,
                payload,
            } => Owned::Event {
                from: from.to_owned(),
                kind: kind.to_owned(),
                payload: payload.to_vec(),
            },
            ToWorker::Export => Owned::Export,
            ToWorker::Import {
                from_version,
                state,
            } => Owned::Import {
                from_version: from_version.to_owned(),
                state: state.to_vec(),
            },
            ToWorker::Exit => Owned::Exit,
            ToWorker::Create { .. } | ToWorker::Replied(_) | ToWorker::Emitted(_) => Owned::Stray,
        }
    }
}

/// Confines this process with Landlock to reading (and mapping) its plugin file's directory
/// and the system's libraries and configuration of the dynamic loader, its own `/proc`
/// entries and a few system-wide ones, `/sys`, and a few devices: no write anywhere, no read of anything else (the state directory, the
/// key file, other plugins). Best effort: says what the kernel enforced.
fn confine(file: &Path) -> String {
    use landlock::{
        path_beneath_rules, Access, AccessFs, Ruleset, RulesetAttr, RulesetCreatedAttr,
        RulesetStatus, ABI,
    };
    let abi = ABI::V5;
    let own = file.parent().unwrap_or(Path::new("/nonexistent"));
    let readable = [
        own,
        Path::new("/usr"),
        Path::new("/lib"),
        Path::new("/lib64"),
        Path::new("/etc/ld.so.cache"),
        Path::new("/etc/localtime"),
        // Its own entries only: another process's (the host's environment, its memory) are
        // readable by any process of the same user, unless confined.
        Path::new("/proc/self"),
        Path::new("/proc/cpuinfo"),
        Path::new("/proc/meminfo"),
        Path::new("/proc/stat"),
        Path::new("/sys"),
        Path::new("/dev/null"),
        Path::new("/dev/zero"),
        Path::new("/dev/urandom"),
        Path::new("/dev/random"),
    ];
    let restricted = Ruleset::default()
        .handle_access(AccessFs::from_all(abi))
        .and_then(|ruleset| ruleset.create())
        .and_then(|ruleset| {
            ruleset.add_rules(path_beneath_rules(readable, AccessFs::from_read(abi)))
        })
        .and_then(|ruleset| ruleset.restrict_self());
    match restricted {
        Ok(status) => match status.ruleset {
            RulesetStatus::FullyEnforced => "landlock: enforced".to_owned(),
            RulesetStatus::PartiallyEnforced => {
                "landlock: partly enforced (this kernel's Landlock is older)".to_owned()
            }
            RulesetStatus::NotEnforced => {
                "landlock: not enforced (this kernel has no Landlock)".to_owned()
            }
        },
        Err(error) => format!("landlock: not enforced ({error})"),
    }
}

/// Takes the two sockets off standard input and output, points those at `/dev/null` and
/// standard error, and closes every other descriptor inherited.
fn take_sockets() -> io::Result<(Conn, Conn)> {
    use nix::unistd::{dup, dup2_stdin, dup2_stdout};
    let call = UnixStream::from(dup(io::stdin())?);
    let side = UnixStream::from(dup(io::stdout())?);
    let null = std::fs::File::open("/dev/null")?;
    dup2_stdin(&null)?;
    dup2_stdout(io::stderr())?;
    drop(null);
    let keep = [call.as_raw_fd(), side.as_raw_fd()];
    let inherited: Vec<i32> = std::fs::read_dir("/proc/self/fd")?
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .filter(|fd| *fd > 2 && !keep.contains(fd))
        .collect();
    for fd in inherited {
        // The directory listing's own descriptor is closed already: EBADF, ignored.
        let _ = nix::unistd::close(fd);
    }
    Ok((Conn::new(call)?, Conn::new(side)?))
}

/// The host, as the worker's instance sees it: every callback crosses a socket.
struct WorkerServices {
    call: Shared,
    side: Shared,
}

impl WorkerServices {
    /// The socket for a callback made now: the call socket on the thread serving a call,
    /// the side socket elsewhere.
    fn conn(&self) -> &Shared {
        if IN_CALL.with(Cell::get) {
            &self.call
        } else {
            &self.side
        }
    }
}

/// Waits for the answer to a callback.
fn answer<T>(conn: &mut Conn, take: impl Fn(ToWorker<'_>) -> Option<T>) -> Result<T, WireError> {
    loop {
        let message = conn.recv::<ToWorker>(SPIN, None)?;
        if let Some(answer) = take(message) {
            return Ok(answer);
        }
    }
}

impl HostServices for WorkerServices {
    fn log(&self, level: LogLevel, target: &str, message: &str) {
        let _ = lock(self.conn()).send(
            &FromWorker::Log {
                level: level as u8,
                target,
                message,
            },
            None,
        );
    }

    fn request(&self, to: &str, kind: &str, payload: &[u8], timeout: Duration) -> Reply {
        let mut conn = lock(self.conn());
        let asked = FromWorker::Request {
            to,
            kind,
            payload,
            timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
        };
        let answered = conn.send(&asked, None).and_then(|()| {
            answer(&mut conn, |message| match message {
                ToWorker::Replied(reply) => Some(reply.to_reply()),
                _ => None,
            })
        });
        answered.unwrap_or_else(|error| {
            Reply::error(codes::FAILED, format!("the host is unreachable: {error}"))
        })
    }

    fn emit(&self, to: &str, kind: &str, payload: &[u8]) -> Result<(), String> {
        let mut conn = lock(self.conn());
        conn.send(&FromWorker::Emit { to, kind, payload }, None)
            .and_then(|()| {
                answer(&mut conn, |message| match message {
                    ToWorker::Emitted(result) => Some(result.map_err(str::to_owned)),
                    _ => None,
                })
            })
            .unwrap_or_else(|error| Err(format!("the host is unreachable: {error}")))
    }
}
