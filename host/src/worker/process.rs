//! One worker process as the host holds it: started, its sockets, a call and its callbacks,
//! and its end (asked for, or how it died).

use std::{
    os::unix::{net::UnixStream, process::ExitStatusExt},
    path::Path,
    process::{Child, Command, ExitStatus, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    sync::Arc,
    time::{Duration, Instant},
};

use plugin_api::{abi::LogLevel, Reply};

use super::{
    child::Limits,
    protocol::{Conn, FromWorker, ToWorker, WireError, WireReply},
};
use crate::{
    instance::HostServices,
    loader::{threads, ShadowCopy},
};

/// What a call came to.
#[derive(Debug)]
pub(super) enum Outcome {
    Created(Result<(), String>),
    Done(Result<(), String>),
    Replied(Reply),
    Exported(Result<Vec<u8>, String>),
}

/// Why a worker could not be brought up to an open file.
#[derive(Debug)]
pub(super) enum StartError {
    /// The program could not be run (the host's trouble).
    Spawn(std::io::Error),
    /// It ended or went silent before it said it runs (the host's trouble).
    NotStarted(String),
    /// It died or went silent while opening the file (the file's fault).
    Crashed(String),
    /// It was killed from outside (SIGKILL, not by the host) while opening the file: an
    /// operator, the OOM killer; not the file's doing.
    Killed(String),
    /// It opened the file and refused it (the file's fault): the loader's message.
    Refused(String),
}

/// A running worker process: its call socket, and the thread that serves its side socket.
#[derive(Debug)]
pub(super) struct Worker {
    child: Child,
    call: Conn,
    side: Option<threads::HostThread>,
    /// The side socket until a thread serves it.
    side_conn: Option<Conn>,
    /// Set by that thread when the side socket closes: the worker is gone (or going).
    side_closed: Arc<AtomicBool>,
    /// Whether it was seen to end by SIGKILL that the host did not send.
    killed_from_outside: bool,
}

/// Why a call got no outcome.
#[derive(Debug)]
pub(super) struct CallError {
    /// Whether the call reached the worker (it was in flight when the worker was lost);
    /// `false` when the worker was gone before it could be sent.
    pub delivered: bool,
    pub error: WireError,
}

/// The manifest a worker read from its file.
#[derive(Debug, Clone)]
pub(super) struct Opened {
    pub name: String,
    pub version: String,
    pub dependencies: Vec<String>,
}

impl Worker {
    /// Starts `program worker SHADOW --as PATH` and waits (until `deadline`) for it to open
    /// the file.
    pub fn start(
        program: &Path,
        copy: &ShadowCopy,
        service: Option<&str>,
        limits: &Limits,
        deadline: Instant,
    ) -> Result<(Worker, Opened, Option<String>), StartError> {
        let (call_host, call_worker) = UnixStream::pair().map_err(StartError::Spawn)?;
        let (side_host, side_worker) = UnixStream::pair().map_err(StartError::Spawn)?;
        let mut command = Command::new(program);
        command
            // The key never reaches a worker, not even by the environment it inherits.
            .env_remove(crate::state::KEY_VARIABLE)
            .env("MICROKERNEL_WORKER_PARENT", std::process::id().to_string())
            .arg("worker")
            .arg(copy.shadow())
            .arg("--as")
            .arg(copy.path())
            .stdin(Stdio::from(std::os::fd::OwnedFd::from(call_worker)))
            .stdout(Stdio::from(std::os::fd::OwnedFd::from(side_worker)))
            .stderr(Stdio::inherit());
        if let Some(service) = service {
            command.arg("--service").arg(service);
        }
        if let Some(bytes) = limits.memory_max {
            command.arg("--memory-max").arg(bytes.to_string());
        }
        if limits.landlock {
            command.arg("--landlock");
        }
        let child = command.spawn().map_err(StartError::Spawn)?;
        // The worker's ends go with the command: its death closes the host's sockets.
        drop(command);
        let conn = |stream| Conn::new(stream).map_err(StartError::Spawn);
        let mut worker = Worker {
            child,
            call: conn(call_host)?,
            side: None,
            side_conn: Some(conn(side_host)?),
            side_closed: Arc::new(AtomicBool::new(false)),
            killed_from_outside: false,
        };
        let confined = match worker
            .call
            .recv::<FromWorker>(Duration::ZERO, Some(deadline))
        {
            Ok(FromWorker::Ready { confined }) => confined.map(str::to_owned),
            Ok(other) => {
                let how = format!("sent {} before it was ready", name_of(&other));
                worker.kill();
                return Err(StartError::NotStarted(how));
            }
            Err(error) => {
                let how = worker.end_of(&error);
                return Err(StartError::NotStarted(how));
            }
        };
        let opened = match worker
            .call
            .recv::<FromWorker>(Duration::ZERO, Some(deadline))
        {
            Ok(FromWorker::Opened(Ok(manifest))) => Ok(Opened {
                name: manifest.name.to_owned(),
                version: manifest.version.to_owned(),
                dependencies: manifest
                    .dependencies
                    .iter()
                    .map(|d| (*d).to_owned())
                    .collect(),
            }),
            Ok(FromWorker::Opened(Err(reason))) => Err(StartError::Refused(reason.to_owned())),
            Ok(other) => Err(StartError::Crashed(format!(
                "sent {} instead of what it opened",
                name_of(&other)
            ))),
            Err(error) => {
                let how = worker.end_of(&error);
                Err(if worker.killed_from_outside() {
                    StartError::Killed(how)
                } else {
                    StartError::Crashed(how)
                })
            }
        };
        match opened {
            Ok(opened) => Ok((worker, opened, confined)),
            Err(error) => {
                worker.kill();
                Err(error)
            }
        }
    }

    /// The worker's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Serves the side socket from now on, on a thread of its own, with `services`.
    pub fn serve_side(&mut self, service: &str, services: Arc<dyn HostServices>) {
        let Some(mut conn) = self.side_conn.take() else {
            return;
        };
        let closed = self.side_closed.clone();
        let served = threads::spawn(&format!("side-{service}"), move || loop {
            match answer_callback(&mut conn, &*services) {
                Ok(()) => {}
                Err(_) => {
                    closed.store(true, Ordering::Release);
                    // A worker that died while idle is restarted now, not at the next
                    // request (one told to exit leaves a nudge that wakes nothing).
                    services.nudge();
                    return;
                }
            }
        });
        match served {
            Ok(handle) => self.side = Some(handle),
            Err(error) => {
                tracing::warn!(service, %error, "no thread to serve the worker's side socket: callbacks from the plugin's own threads go unanswered");
            }
        }
    }

    /// Whether the worker is known to be gone: its side socket closed.
    pub fn gone(&self) -> bool {
        self.side_closed.load(Ordering::Acquire)
    }

    /// Sends `message` and waits for its outcome, answering the callbacks that come first;
    /// gives up at `deadline`.
    pub fn call(
        &mut self,
        message: &ToWorker<'_>,
        services: &dyn HostServices,
        spin: Duration,
        deadline: Instant,
    ) -> Result<Outcome, CallError> {
        if self.gone() {
            return Err(CallError {
                delivered: false,
                error: WireError::Closed,
            });
        }
        self.send(message, deadline).map_err(|error| CallError {
            delivered: false,
            error,
        })?;
        self.outcome(services, spin, deadline)
            .map_err(|error| CallError {
                delivered: true,
                error,
            })
    }

    /// Sends `message`, the first half of [`Worker::call`].
    pub fn send(&mut self, message: &ToWorker<'_>, deadline: Instant) -> Result<(), WireError> {
        self.call.send(message, Some(deadline))
    }

    /// Waits for the outcome of the call sent last, answering the callbacks that come
    /// first; gives up at `deadline` (a frame half read stays buffered for the next wait).
    pub fn outcome(
        &mut self,
        services: &dyn HostServices,
        spin: Duration,
        deadline: Instant,
    ) -> Result<Outcome, WireError> {
        loop {
            let received = self.call.recv::<FromWorker>(spin, Some(deadline))?;
            let callback = match received {
                FromWorker::Created(created) => {
                    return Ok(Outcome::Created(created.map_err(str::to_owned)));
                }
                FromWorker::Done(done) => {
                    return Ok(Outcome::Done(done.map_err(str::to_owned)));
                }
                FromWorker::Replied(reply) => return Ok(Outcome::Replied(reply.to_reply())),
                FromWorker::Exported(exported) => {
                    return Ok(Outcome::Exported(
                        exported.map(<[u8]>::to_vec).map_err(str::to_owned),
                    ))
                }
                other @ (FromWorker::Log { .. }
                | FromWorker::Request { .. }
                | FromWorker::Emit { .. }) => serve_callback(other, services),
                other => {
                    return Err(WireError::Malformed(format!(
                        "sent {} in the middle of a call",
                        name_of(&other)
                    )))
                }
            };
            if let Some(answer) = callback {
                answer.send(&mut self.call, Some(deadline))?;
            }
        }
    }

    /// Asks the worker to create its instance with `config`; the outcome is the plugin's.
    pub fn create(
        &mut self,
        config: Option<&str>,
        services: &dyn HostServices,
        spin: Duration,
        deadline: Instant,
    ) -> Result<Result<(), String>, WireError> {
        self.send(&ToWorker::Create { config }, deadline)?;
        match self.outcome(services, spin, deadline)? {
            Outcome::Created(created) => Ok(created),
            other => Err(WireError::Malformed(format!(
                "answered {other:?} instead of creating its instance"
            ))),
        }
    }

    /// Kills the worker (if it still runs) and describes how it ended after `error`.
    pub fn end_of(&mut self, error: &WireError) -> String {
        let timed_out = matches!(error, WireError::TimedOut(_));
        let status = match self.child.try_wait() {
            Ok(Some(status)) => Some(status),
            _ => {
                // Gone but not reaped yet (the socket closes a moment before), or alive:
                // a live one is killed, which the host can do, unlike a hung thread.
                let closed = matches!(error, WireError::Closed);
                if closed {
                    wait_briefly(&mut self.child)
                } else {
                    None
                }
            }
        };
        match status {
            Some(status) => {
                self.killed_from_outside = status.signal() == Some(libc::SIGKILL);
                describe(status)
            }
            None => {
                self.kill();
                if timed_out {
                    format!("{error}, and was killed")
                } else {
                    format!("ended its exchange with the host ({error}), and was killed")
                }
            }
        }
    }

    /// Whether [`Worker::end_of`] found it killed by a SIGKILL the host did not send.
    pub fn killed_from_outside(&self) -> bool {
        self.killed_from_outside
    }

    /// Kills and reaps the process.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Asks the worker to exit, and waits for it until `deadline`; kills it then.
    pub fn exit(mut self, deadline: Instant) {
        let _ = self.call.send(&ToWorker::Exit, Some(deadline));
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() >= deadline => {
                    tracing::warn!(
                        pid = self.child.id(),
                        "a worker did not exit in time; killed"
                    );
                    self.kill();
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(1)),
            }
        }
        if let Some(mut side) = self.side.take() {
            // Its socket is closed now: the thread ends at once, unless a callback of the
            // plugin's own threads is still being routed (it has a timeout of its own); it
            // is left to end then.
            side.join_until(deadline);
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.kill();
        }
    }
}

/// Waits a little for a process whose socket just closed to be reapable.
fn wait_briefly(child: &mut Child) -> Option<ExitStatus> {
    let until = Instant::now() + Duration::from_secs(2);
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < until => std::thread::sleep(Duration::from_micros(200)),
            _ => return None,
        }
    }
}

/// How a process ended, in words.
pub(super) fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (_, Some(signal)) => format!(
            "was killed by {}{}",
            signal_name(signal),
            if status.core_dumped() {
                " (core dumped)"
            } else {
                ""
            }
        ),
        _ => "ended".to_owned(),
    }
}

fn signal_name(signal: i32) -> String {
    match nix::sys::signal::Signal::try_from(signal) {
        Ok(signal) => signal.as_str().to_owned(),
        Err(_) => format!("signal {signal}"),
    }
}

fn name_of(message: &FromWorker<'_>) -> &'static str {
    match message {
        FromWorker::Ready { .. } => "`ready`",
        FromWorker::Opened(_) => "`opened`",
        FromWorker::Created(_) => "`created`",
        FromWorker::Done(_) => "`done`",
        FromWorker::Replied(_) => "a reply",
        FromWorker::Exported(_) => "a state",
        FromWorker::Log { .. } => "a log line",
        FromWorker::Request { .. } => "a request",
        FromWorker::Emit { .. } => "an event",
    }
}

/// The answer owed to a callback.
enum Answer {
    Reply(Reply),
    Emitted(Result<(), String>),
}

impl Answer {
    fn send(&self, conn: &mut Conn, deadline: Option<Instant>) -> Result<(), WireError> {
        match self {
            Answer::Reply(reply) => conn.send(&ToWorker::Replied(WireReply::of(reply)), deadline),
            Answer::Emitted(result) => conn.send(
                &ToWorker::Emitted(result.as_ref().map(|_| ()).map_err(String::as_str)),
                deadline,
            ),
        }
    }
}

/// Runs a callback of the plugin's; returns the answer it is owed, if any.
fn serve_callback(message: FromWorker<'_>, services: &dyn HostServices) -> Option<Answer> {
    match message {
        FromWorker::Log {
            level,
            target,
            message,
        } => {
            services.log(level_of(level), target, message);
            None
        }
        FromWorker::Request {
            to,
            kind,
            payload,
            timeout_ms,
        } => Some(Answer::Reply(services.request(
            to,
            kind,
            payload,
            Duration::from_millis(timeout_ms),
        ))),
        FromWorker::Emit { to, kind, payload } => {
            Some(Answer::Emitted(services.emit(to, kind, payload)))
        }
        _ => None,
    }
}

/// Serves one callback from the side socket.
fn answer_callback(conn: &mut Conn, services: &dyn HostServices) -> Result<(), WireError> {
    let message = conn.recv::<FromWorker>(Duration::ZERO, None)?;
    if let Some(answer) = serve_callback(message, services) {
        answer.send(conn, None)?;
    }
    Ok(())
}

fn level_of(level: u8) -> LogLevel {
    match level {
        1 => LogLevel::Error,
        2 => LogLevel::Warn,
        3 => LogLevel::Info,
        4 => LogLevel::Debug,
        _ => LogLevel::Trace,
    }
}
