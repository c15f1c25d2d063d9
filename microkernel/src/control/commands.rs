//! What each control command does.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Select, Sender, TryRecvError};

use super::{FleetNode, FleetView, Request, Response, ServiceEntry};
use host::{kernel::PendingReply, reload::Verdicts, Checkpoint, Kernel};

use crate::event::Event;

/// What carrying commands out needs.
pub(super) struct Context {
    pub(super) kernel: Arc<Kernel>,
    pub(super) verdicts: Verdicts,
    pub(super) events: Sender<Event>,
    /// Those waiting for the checkpoint under way, if one is.
    pub(super) checkpoint: Arc<Mutex<Option<Vec<Sender<Response>>>>>,
    /// The fleet this host is one of.
    pub(super) fleet: Option<Arc<fleet::Fleet>>,
}

/// A request line, or the error answer a malformed one (invalid UTF-8 included) gets.
pub(super) fn parse(line: &[u8]) -> Result<Request, Response> {
    let line = std::str::from_utf8(line).map_err(|e| Response::Error {
        message: format!("bad control request: not valid UTF-8 ({e})"),
    })?;
    serde_json::from_str::<Request>(line).map_err(|e| Response::Error {
        message: format!("bad control request: {e}"),
    })
}

/// The answer to one request line.
#[cfg(test)]
pub(super) fn answer(line: &[u8], context: &Context) -> Response {
    match parse(line) {
        Ok(request) => handle(request, context),
        Err(error) => error,
    }
}

fn done(lines: Vec<(String, bool)>) -> Response {
    let failed = lines.iter().any(|(_, failed)| *failed);
    Response::Done {
        lines: lines.into_iter().map(|(line, _)| line).collect(),
        failed,
    }
}

/// What a command gives at once: its answer, or where its answer will come (a request to a
/// service, a rescan, a checkpoint), so that no thread waits for it.
pub(super) enum Outcome {
    /// The answer.
    Now(Response),
    /// Where the answer comes.
    Later(Pending),
}

/// An answer to come.
#[derive(Debug)]
pub(super) enum Pending {
    /// A service's reply.
    Reply(PendingReply),
    /// A rescan's lines.
    Lines(Receiver<Vec<(String, bool)>>),
    /// A whole answer.
    Answer(Receiver<Response>),
}

impl Pending {
    /// Adds its channel to `select`.
    pub(super) fn add_to<'a>(&'a self, select: &mut Select<'a>) {
        match self {
            Pending::Reply(pending) => select.recv(&pending.rx),
            Pending::Lines(rx) => select.recv(rx),
            Pending::Answer(rx) => select.recv(rx),
        };
    }

    /// When the requester stops waiting, if it does.
    pub(super) fn deadline(&self) -> Option<Instant> {
        match self {
            Pending::Reply(pending) => Some(pending.deadline),
            Pending::Lines(_) | Pending::Answer(_) => None,
        }
    }

    /// The answer, if it has come (or can never come); `Err(self)` while it has not.
    pub(super) fn try_answer(self) -> Result<Response, Pending> {
        let closed = || Response::Error {
            message: "the host is shutting down".into(),
        };
        match self {
            Pending::Reply(pending) => match pending.rx.try_recv() {
                Ok(reply) => Ok(reply_response(pending.reply(Ok(reply)))),
                Err(TryRecvError::Disconnected) => Ok(reply_response(
                    pending.reply(Err(RecvTimeoutError::Disconnected)),
                )),
                Err(TryRecvError::Empty) => Err(Pending::Reply(pending)),
            },
            Pending::Lines(rx) => match rx.try_recv() {
                Ok(lines) => Ok(done(lines)),
                Err(TryRecvError::Disconnected) => Ok(closed()),
                Err(TryRecvError::Empty) => Err(Pending::Lines(rx)),
            },
            Pending::Answer(rx) => match rx.try_recv() {
                Ok(response) => Ok(response),
                Err(TryRecvError::Disconnected) => Ok(closed()),
                Err(TryRecvError::Empty) => Err(Pending::Answer(rx)),
            },
        }
    }

    /// The answer of a requester that stopped waiting (its deadline passed).
    pub(super) fn timed_out(self) -> Response {
        match self {
            Pending::Reply(pending) => {
                reply_response(pending.reply(Err(RecvTimeoutError::Timeout)))
            }
            other => match other.try_answer() {
                Ok(response) => response,
                Err(_) => Response::Error {
                    message: "no answer in time".into(),
                },
            },
        }
    }

    /// Waits for the answer (for a worker, and the tests).
    fn wait(self) -> Response {
        let mut pending = self;
        loop {
            let mut select = Select::new();
            pending.add_to(&mut select);
            match pending.deadline() {
                Some(deadline) => {
                    if select.ready_deadline(deadline).is_err() {
                        return pending.timed_out();
                    }
                }
                None => {
                    select.ready();
                }
            }
            drop(select);
            match pending.try_answer() {
                Ok(response) => return response,
                Err(again) => pending = again,
            }
        }
    }
}

fn reply_response(reply: plugin_api::Reply) -> Response {
    Response::Reply {
        code: reply.code,
        message: reply.message,
        data: hex::encode(reply.data),
    }
}

/// Begins `request` without waiting on anything: `Err(request)` for the commands that wait
/// on a service's operations lock (`stop`, `start`), which a worker carries out.
pub(super) fn begin(request: Request, context: &Context) -> Result<Outcome, Request> {
    let Context {
        kernel,
        verdicts,
        events,
        checkpoint,
        ..
    } = context;
    Ok(match request {
        Request::List => {
            let orphaned = verdicts.orphans();
            let services: Vec<ServiceEntry> = kernel
                .list()
                .into_iter()
                .map(|info| {
                    let rejected = verdicts.rejected_lines(&info.name);
                    let no_file = orphaned
                        .iter()
                        .find(|(service, _)| *service == info.name)
                        .map(|(_, why)| why.clone());
                    ServiceEntry::new(info, rejected, no_file)
                })
                .collect();
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
            Outcome::Now(Response::Services {
                services,
                broken: verdicts.broken_lines(),
                rejected_elsewhere,
                orphaned,
            })
        }
        Request::Send {
            service,
            kind,
            payload,
            timeout_ms,
        } => match hex::decode(&payload) {
            // A full mailbox is answered at once: no thread waits for room in it.
            Ok(payload) => match kernel.post_request(
                &service,
                &kind,
                &payload,
                timeout_ms.map(Duration::from_millis),
                Duration::ZERO,
            ) {
                Ok(pending) => Outcome::Later(Pending::Reply(pending)),
                Err(reply) => Outcome::Now(reply_response(reply)),
            },
            Err(e) => Outcome::Now(Response::Error {
                message: format!("payload is not hex: {e}"),
            }),
        },
        Request::Reload { service, retry } => {
            let (tx, rx) = bounded(1);
            let sent = events.send(Event::Reload {
                service,
                retry,
                reply: Some(tx),
            });
            match sent {
                Ok(()) => Outcome::Later(Pending::Lines(rx)),
                Err(_) => Outcome::Now(Response::Error {
                    message: "the host is shutting down".into(),
                }),
            }
        }
        Request::Checkpoint => {
            // One checkpoint at a time: those asked for meanwhile get its answer.
            let (tx, rx) = bounded(1);
            let mut waiting = lock(checkpoint);
            match &mut *waiting {
                Some(others) => others.push(tx),
                None => {
                    *waiting = Some(vec![tx]);
                    let kernel = kernel.clone();
                    let checkpoint = checkpoint.clone();
                    let spawned =
                        host::loader::threads::spawn_detached("ctl-checkpoint", move || {
                            let response = checkpoint_all(&kernel);
                            for tx in lock(&checkpoint).take().into_iter().flatten() {
                                let _ = tx.send(response.clone());
                            }
                        });
                    if let Err(error) = spawned {
                        *waiting = None;
                        return Ok(Outcome::Now(Response::Error {
                            message: format!("no thread for the checkpoint: {error}"),
                        }));
                    }
                }
            }
            Outcome::Later(Pending::Answer(rx))
        }
        request @ (Request::Stop { .. } | Request::Start { .. } | Request::Fleet) => {
            return Err(request)
        }
    })
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

fn checkpoint_all(kernel: &Kernel) -> Response {
    let lines = kernel
        .checkpoint()
        .into_iter()
        .map(|(service, result)| match result {
            Ok(Checkpoint::Written) => (format!("{service}: written"), false),
            Ok(Checkpoint::Unchanged) => (format!("{service}: unchanged"), false),
            Err(e) => (format!("{service}: {}", host::error_chain(&e)), true),
        })
        .collect();
    done(lines)
}

/// Carries `request` out, waiting for its answer (a worker's way).
pub(super) fn handle(request: Request, context: &Context) -> Response {
    match begin(request, context) {
        Ok(Outcome::Now(response)) => response,
        Ok(Outcome::Later(pending)) => pending.wait(),
        Err(Request::Stop { service }) => match context.kernel.stop(&service) {
            Ok(()) => done(vec![(format!("{service}: stopped"), false)]),
            Err(e) => done(vec![(host::error_chain(&e), true)]),
        },
        Err(Request::Start { service }) => match context.kernel.start(&service) {
            Ok(()) => done(vec![(format!("{service}: running"), false)]),
            Err(e) => done(vec![(host::error_chain(&e), true)]),
        },
        Err(Request::Fleet) => match &context.fleet {
            Some(fleet) => fleet_view(fleet, &context.kernel),
            None => Response::Error {
                message: "this host is not one of a fleet (see `run --cluster`)".into(),
            },
        },
        Err(_) => Response::Error {
            message: "this command is begun, not carried out".into(),
        },
    }
}

/// `fleet`: the nodes and what each owns, read from etcd now.
fn fleet_view(fleet: &fleet::Fleet, kernel: &Kernel) -> Response {
    let read = fleet
        .read_nodes()
        .and_then(|nodes| Ok((nodes, fleet.read_owners()?)));
    let (nodes, owners) = match read {
        Ok(read) => read,
        Err(error) => {
            return Response::Error {
                message: host::error_chain(&error),
            }
        }
    };
    let session = fleet.session();
    let now = std::time::Instant::now();
    let unowned = kernel
        .list()
        .into_iter()
        .map(|info| info.name)
        .filter(|name| !owners.contains_key(name))
        .collect();
    Response::Fleet(Box::new(FleetView {
        node: fleet.node().to_owned(),
        etcd: fleet.endpoints(),
        lease: session.as_ref().map(|s| format!("{:x}", s.lease())),
        lease_ttl_ms: millis(fleet.ttl()),
        valid_for_ms: session
            .as_ref()
            .map(|s| millis(s.valid_until().saturating_duration_since(now))),
        refused_writes: fleet.refused_writes(),
        nodes: nodes
            .into_iter()
            .map(|(record, lease)| FleetNode {
                lease: format!("{lease:x}"),
                services: owners
                    .iter()
                    .filter(|(_, owner)| **owner == record.node)
                    .map(|(service, _)| service.clone())
                    .collect(),
                node: record.node,
                pid: record.pid,
                since: record.since,
            })
            .collect(),
        unowned,
    }))
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}
