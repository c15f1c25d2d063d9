//! What a service's executors are sent: the service's [`Mailbox`], and the [`Letter`]s and
//! kernel operations ([`Envelope`]) in it.

use std::{sync::Arc, time::Instant};

use crossbeam_channel::{bounded, Receiver, Sender};
use plugin_api::{codes, Reply};

use super::ops::Op;
use crate::instance::Message;

/// A request or an event on its way to a service, in the fewest allocations that carry it:
/// the recipient is the mailbox's service; the sender a shared name, or none for `external`
/// (a reference count shared by every request from outside would bounce between the CPUs,
/// which was half an event's cost); kind and payload one buffer.
pub(crate) struct Letter {
    from: Option<Arc<str>>,
    /// The kind's bytes, then the payload's.
    body: Vec<u8>,
    kind_len: usize,
}

impl Letter {
    /// A letter from `from` (`None`: from outside the host).
    pub fn new(from: Option<Arc<str>>, kind: &str, payload: &[u8]) -> Letter {
        let mut body = Vec::with_capacity(kind.len() + payload.len());
        body.extend_from_slice(kind.as_bytes());
        body.extend_from_slice(payload);
        Letter {
            from,
            body,
            kind_len: kind.len(),
        }
    }

    fn from(&self) -> &str {
        self.from.as_deref().unwrap_or("external")
    }

    pub(super) fn kind(&self) -> &str {
        // Written from a `&str` in `new`.
        std::str::from_utf8(&self.body[..self.kind_len]).unwrap_or_default()
    }

    /// Lends it to the instance of `to` for the length of a call.
    pub(super) fn lend<'a>(&'a self, to: &'a str) -> Message<'a> {
        Message {
            from: self.from(),
            to,
            kind: self.kind(),
            payload: &self.body[self.kind_len..],
        }
    }
}

/// A message for a service's executor.
pub(crate) enum Envelope {
    /// A request; the reply goes back through `reply`.
    Request {
        letter: Letter,
        /// Services waiting, in order, for this request to complete (its call chain).
        chain: Vec<Arc<str>>,
        reply: Sender<Reply>,
        /// When it was posted (its latency is measured from there).
        sent: Instant,
    },
    /// A one-way event.
    Event { letter: Letter },
    /// An operation of the kernel on one executor: made and answered only in `ops.rs`.
    Op(Op),
    /// Nothing to do: wakes the executor, whose instance then looks after itself (one whose
    /// worker process died while idle brings up the next; see
    /// [`crate::instance::ServiceInstance::answered`]).
    Nudge,
}

/// A service's mailbox: bounded, owned by the service, shared by its successive executors.
#[derive(Clone)]
pub(crate) struct Mailbox {
    pub tx: Sender<Envelope>,
    pub rx: Receiver<Envelope>,
}

impl Mailbox {
    /// A mailbox for `capacity` messages (at least one: a zero-capacity channel would refuse
    /// every event).
    pub fn new(capacity: usize) -> Self {
        let (tx, rx) = bounded(capacity.max(1));
        Mailbox { tx, rx }
    }

    /// Answers everything queued with "not running"; used once no executor will serve it.
    pub fn drain(&self, service: &str) {
        let mut dropped_events = 0usize;
        for envelope in self.rx.try_iter() {
            match envelope {
                Envelope::Request { reply, .. } => {
                    let _ = reply.send(Reply::error(
                        codes::NOT_FOUND,
                        format!("service `{service}` is not running"),
                    ));
                }
                Envelope::Event { .. } => dropped_events += 1,
                Envelope::Op(op) => op.refuse(),
                Envelope::Nudge => {}
            }
        }
        if dropped_events > 0 {
            tracing::warn!(
                service,
                dropped_events,
                "events discarded: the service is not running"
            );
        }
    }
}
