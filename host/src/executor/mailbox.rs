//! What a service's executors are sent: the service's [`Mailbox`], and the [`Letter`]s and
//! kernel operations ([`Envelope`]) in it.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Select, Sender, TryRecvError};
use plugin_api::{codes, Reply};

use super::ops::Op;
use crate::{
    instance::{Lane, Laned, Message},
    metrics::ServiceMetrics,
};

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
    /// Whether a request may skip the executor (see [`Mailbox::through_lane`]).
    gate: Arc<parking_lot::Mutex<Gate>>,
}

/// The way past the executor, open while an executor whose instance has a [`Lane`] serves
/// the mailbox.
#[derive(Default)]
struct Gate {
    /// The serving instance's lane, and where its replies are counted.
    lane: Option<(Arc<dyn Lane>, ServiceMetrics)>,
    /// Whether the executor took a message it has not finished with. Set under the gate's
    /// lock as the message is taken: a message is in the mailbox, or being handled, or
    /// done, and a requester holding the lock sees which.
    busy: bool,
}

impl Mailbox {
    /// A mailbox for `capacity` messages (at least one: a zero-capacity channel would refuse
    /// every event).
    pub fn new(capacity: usize) -> Self {
        let (tx, rx) = bounded(capacity.max(1));
        Mailbox {
            tx,
            rx,
            gate: Default::default(),
        }
    }

    /// Handles a request on the caller's thread through the serving instance's lane, if
    /// there is one and nothing else is going on: nothing queued, the executor idle, no
    /// other lane call. [`Laned::Refused`] when not, or when the lane refused: post it then.
    ///
    /// A message posted before this call is in the mailbox or being handled, so the
    /// request never overtakes it; the executor, which takes the gate's lock to take a
    /// message, waits for the lane call to end, so calls into the instance never overlap.
    /// A hot replace, a checkpoint or a stop is a message: while one is under way every
    /// request goes through the mailbox.
    pub fn through_lane(
        &self,
        request: Message<'_>,
        chain: &[Arc<str>],
        deadline: Instant,
    ) -> Laned {
        // Another lane call going on: the mailbox, rather than a wait on a lock.
        let Some(gate) = self.gate.try_lock() else {
            return Laned::Refused;
        };
        let Some((lane, metrics)) = gate
            .lane
            .as_ref()
            .filter(|_| !gate.busy && self.rx.is_empty())
        else {
            return Laned::Refused;
        };
        let sent = Instant::now();
        let to = Arc::<str>::from(request.to);
        let laned = super::with_chain(chain, &to, || lane.handle(request, deadline));
        if let Laned::Replied(reply) = &laned {
            metrics.reply(reply.code, sent.elapsed());
        }
        laned
    }

    /// Opens the gate to `lane` (an executor starts serving), counting replies in
    /// `metrics`.
    pub(super) fn open(&self, lane: Arc<dyn Lane>, metrics: ServiceMetrics) {
        let mut gate = self.gate.lock();
        gate.lane = Some((lane, metrics));
        gate.busy = false;
    }

    /// Closes the gate to `lane`, if it is the one open (an executor stops serving).
    pub(super) fn close(&self, lane: &Arc<dyn Lane>) {
        let mut gate = self.gate.lock();
        if gate
            .lane
            .as_ref()
            .is_some_and(|(open, _)| Arc::ptr_eq(open, lane))
        {
            *gate = Gate::default();
        }
    }

    /// The next message, for an executor whose instance has a lane: polls for `spin`, then
    /// sleeps until one comes, and takes it under the gate's lock (after any lane call
    /// going on), marking the executor busy until [`Mailbox::done`].
    pub(super) fn take(&self, spin: Duration) -> Result<Envelope, RecvTimeoutError> {
        let started = Instant::now();
        loop {
            if self.rx.is_empty() {
                if started.elapsed() < spin {
                    std::thread::yield_now();
                    continue;
                }
                // Ready when a message is queued or the channel closed; takes nothing.
                let mut select = Select::new();
                select.recv(&self.rx);
                select.ready();
            }
            let mut gate = self.gate.lock();
            match self.rx.try_recv() {
                Ok(envelope) => {
                    gate.busy = true;
                    return Ok(envelope);
                }
                Err(TryRecvError::Disconnected) => return Err(RecvTimeoutError::Disconnected),
                Err(TryRecvError::Empty) => {}
            }
        }
    }

    /// The executor is done with the message [`Mailbox::take`] gave it.
    pub(super) fn done(&self) {
        self.gate.lock().busy = false;
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
