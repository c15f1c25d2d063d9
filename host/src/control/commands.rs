//! What each control command does.

use std::{sync::Arc, time::Duration};

use crossbeam_channel::{bounded, Sender};

use super::{Request, Response};
use crate::{daemon::Event, reload::Verdicts, Checkpoint, Kernel};

/// What the workers need to carry a request out.
pub(super) struct Context {
    pub(super) kernel: Arc<Kernel>,
    pub(super) verdicts: Verdicts,
    pub(super) events: Sender<Event>,
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

pub(super) fn handle(request: Request, context: &Context) -> Response {
    let Context {
        kernel,
        verdicts,
        events,
    } = context;
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
