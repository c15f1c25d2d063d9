//! The control socket: a Unix domain socket (mode 0600, peers of another uid refused) that
//! speaks one JSON object per line each way. `microkernel ctl` is its client.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::{
        fs::{FileTypeExt, PermissionsExt},
        net::{UnixListener, UnixStream},
    },
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{bail, Context};
use crossbeam_channel::{bounded, Sender};
use serde::{Deserialize, Serialize};

use crate::{daemon::Event, loader::threads, reload::Verdicts, Checkpoint, Kernel, ServiceInfo};

/// A command sent to the host.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase")]
pub enum Request {
    /// The services.
    List,
    /// A request to a service.
    Send {
        /// Target service.
        service: String,
        /// Request kind.
        kind: String,
        /// Payload, hex.
        payload: String,
        /// Timeout in milliseconds; the host's default when absent.
        timeout_ms: Option<u64>,
    },
    /// A rescan.
    Reload {
        /// Limit to one service.
        service: Option<String>,
        /// Try the files rejected earlier again.
        #[serde(default)]
        retry: bool,
    },
    /// A checkpoint of every service.
    Checkpoint,
    /// Stop a service.
    Stop {
        /// The service.
        service: String,
    },
    /// Start a service.
    Start {
        /// The service.
        service: String,
    },
}

/// The host's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "lowercase")]
pub enum Response {
    /// `list`.
    Services {
        /// Every service.
        services: Vec<ServiceInfo>,
        /// Plugin files that failed to load for a reason of their own (they provide no
        /// service the host could tell), one line each.
        #[serde(default)]
        broken: Vec<String>,
        /// Services that are not registered and have rejected files only: `(service, line)`.
        #[serde(default)]
        rejected_elsewhere: Vec<(String, String)>,
    },
    /// `send`.
    Reply {
        /// Reply code.
        code: u32,
        /// Reply message.
        message: String,
        /// Reply data, hex.
        data: String,
    },
    /// What was done, line by line (`reload`, `checkpoint`, `start`, `stop`); `failed` when
    /// any line is an error.
    Done {
        /// One line per action.
        lines: Vec<String>,
        /// Whether something failed.
        failed: bool,
    },
    /// The command could not be carried out.
    Error {
        /// Why.
        message: String,
    },
}

/// The listening side. Removes its socket file when dropped.
#[derive(Debug)]
pub struct ControlServer {
    path: PathBuf,
    /// Until [`ControlServer::serve`] hands it to the control thread.
    listener: Option<UnixListener>,
}

impl ControlServer {
    /// Binds the socket (refusing to steal one a live host listens on), mode 0600.
    /// Connections wait in the backlog until [`ControlServer::serve`].
    pub fn bind(path: &Path) -> anyhow::Result<Self> {
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_socket() => {
                if UnixStream::connect(path).is_ok() {
                    bail!(
                        "another host is already listening on control socket {}",
                        path.display()
                    );
                }
                // A socket no host answers on: what a host that died left behind.
                std::fs::remove_file(path).with_context(|| {
                    format!("removing stale control socket {}", path.display())
                })?;
            }
            Ok(meta) => bail!(
                "control socket {} exists and is not a socket (it is {}); refusing to replace it: choose another --socket path",
                path.display(),
                describe_file_type(meta.file_type())
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("checking control socket path {}", path.display())
                })
            }
        }
        let listener = UnixListener::bind(path)
            .with_context(|| format!("binding control socket {}", path.display()))?;
        // From here on, dropping `self` removes the socket file.
        let server = ControlServer {
            path: path.to_owned(),
            listener: Some(listener),
        };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("setting the mode of control socket {}", path.display()))?;
        Ok(server)
    }

    /// Serves each connection on a thread of its own, from now on.
    pub fn serve(
        &mut self,
        kernel: Arc<Kernel>,
        verdicts: Verdicts,
        events: Sender<Event>,
    ) -> anyhow::Result<()> {
        let Some(listener) = self.listener.take() else {
            bail!("control socket {} is already served", self.path.display());
        };
        let owner = nix::unistd::getuid();
        threads::spawn_detached("control", move || {
            for stream in listener.incoming() {
                let stream = match stream {
                    Ok(stream) => stream,
                    Err(error) => {
                        tracing::warn!(%error, "control socket: accept failed");
                        continue;
                    }
                };
                let kernel = kernel.clone();
                let events = events.clone();
                let verdicts = verdicts.clone();
                let spawned = threads::spawn_detached("control-conn", move || {
                    serve(stream, owner, &kernel, &verdicts, &events)
                });
                if let Err(error) = spawned {
                    tracing::warn!(%error, "control socket: connection dropped, no thread for it");
                }
            }
        })
        .context("starting the control thread")?;
        tracing::info!(socket = %self.path.display(), "control socket serving");
        Ok(())
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn serve(
    stream: UnixStream,
    owner: nix::unistd::Uid,
    kernel: &Kernel,
    verdicts: &Verdicts,
    events: &Sender<Event>,
) {
    let peer = nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials);
    let mut writer = match stream.try_clone() {
        Ok(writer) => writer,
        Err(_) => return,
    };
    let respond = |writer: &mut UnixStream, response: &Response| {
        let mut line = serde_json::to_string(response).unwrap_or_default();
        line.push('\n');
        writer.write_all(line.as_bytes())
    };
    match peer {
        Ok(credentials) if credentials.uid() == owner.as_raw() => {}
        Ok(credentials) => {
            tracing::warn!(
                uid = credentials.uid(),
                "control connection from another user refused"
            );
            let _ = respond(
                &mut writer,
                &Response::Error {
                    message: format!(
                        "refused: uid {} is not the host's uid {owner}",
                        credentials.uid()
                    ),
                },
            );
            return;
        }
        Err(error) => {
            tracing::warn!(%error, "control connection refused: peer credentials unavailable");
            return;
        }
    }
    for line in BufReader::new(stream).lines() {
        let Ok(line) = line else { return };
        let response = match serde_json::from_str::<Request>(&line) {
            Ok(request) => handle(request, kernel, verdicts, events),
            Err(e) => Response::Error {
                message: format!("bad control request: {e}"),
            },
        };
        if respond(&mut writer, &response).is_err() {
            return;
        }
    }
}

fn done(lines: Vec<(String, bool)>) -> Response {
    let failed = lines.iter().any(|(_, failed)| *failed);
    Response::Done {
        lines: lines.into_iter().map(|(line, _)| line).collect(),
        failed,
    }
}

fn handle(
    request: Request,
    kernel: &Kernel,
    verdicts: &Verdicts,
    events: &Sender<Event>,
) -> Response {
    match request {
        Request::List => {
            let mut services = kernel.list();
            for info in &mut services {
                info.rejected = verdicts.rejected_lines(&info.name);
            }
            let rejected_elsewhere = verdicts
                .services_with_rejections()
                .into_iter()
                .filter(|s| !services.iter().any(|info| info.name == *s))
                .flat_map(|s| {
                    verdicts
                        .rejected_lines(&s)
                        .into_iter()
                        .map(move |line| (s.clone(), line))
                })
                .collect();
            Response::Services {
                services,
                broken: verdicts.broken_lines(),
                rejected_elsewhere,
            }
        }
        Request::Send {
            service,
            kind,
            payload,
            timeout_ms,
        } => match hex::decode(&payload) {
            Ok(payload) => {
                let reply = kernel.request(
                    &service,
                    &kind,
                    &payload,
                    timeout_ms.map(Duration::from_millis),
                );
                Response::Reply {
                    code: reply.code,
                    message: reply.message,
                    data: hex::encode(reply.data),
                }
            }
            Err(e) => Response::Error {
                message: format!("payload is not hex: {e}"),
            },
        },
        Request::Reload { service, retry } => {
            let (tx, rx) = bounded(1);
            if events
                .send(Event::Reload {
                    service,
                    retry,
                    reply: Some(tx),
                })
                .is_err()
            {
                return Response::Error {
                    message: "the host is shutting down".into(),
                };
            }
            match rx.recv() {
                Ok(lines) => done(lines),
                Err(_) => Response::Error {
                    message: "the host is shutting down".into(),
                },
            }
        }
        Request::Checkpoint => {
            let lines = kernel
                .checkpoint()
                .into_iter()
                .map(|(service, result)| match result {
                    Ok(Checkpoint::Written) => (format!("{service}: written"), false),
                    Ok(Checkpoint::Unchanged) => (format!("{service}: unchanged"), false),
                    Err(e) => (format!("{service}: {}", crate::error_chain(&e)), true),
                })
                .collect();
            done(lines)
        }
        Request::Stop { service } => match kernel.stop(&service) {
            Ok(()) => done(vec![(format!("{service}: stopped"), false)]),
            Err(e) => done(vec![(crate::error_chain(&e), true)]),
        },
        Request::Start { service } => match kernel.start(&service) {
            Ok(()) => done(vec![(format!("{service}: running"), false)]),
            Err(e) => done(vec![(crate::error_chain(&e), true)]),
        },
    }
}

/// Names a kind of file, for messages.
fn describe_file_type(kind: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if kind.is_dir() {
        "a directory"
    } else if kind.is_symlink() {
        "a symbolic link"
    } else if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_block_device() || kind.is_char_device() {
        "a device"
    } else {
        "a regular file"
    }
}

/// Sends one command to the host listening on `path` and returns its response.
pub fn call(path: &Path, request: &Request) -> anyhow::Result<Response> {
    let mut stream = UnixStream::connect(path).with_context(|| {
        format!("cannot connect to control socket {} (is the host running? see --socket and --state-dir)", path.display())
    })?;
    let mut line = serde_json::to_string(request)?;
    line.push('\n');
    stream.write_all(line.as_bytes())?;
    let mut answer = String::new();
    BufReader::new(&stream)
        .read_line(&mut answer)
        .with_context(|| format!("reading from control socket {}", path.display()))?;
    if answer.is_empty() {
        bail!(
            "the host closed control socket {} without answering",
            path.display()
        );
    }
    serde_json::from_str(&answer).with_context(|| format!("bad answer from the host: {answer}"))
}
