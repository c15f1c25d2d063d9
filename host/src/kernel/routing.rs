//! Requests and events: from plugins (through their host handle), from outside, and to the
//! kernel itself.

use std::{
    sync::{Arc, Weak},
    time::{Duration, Instant},
};

use crossbeam_channel::{bounded, RecvTimeoutError, SendTimeoutError, TrySendError};
use plugin_api::{abi::LogLevel, codes, Reply};

use super::{KernelInner, ServiceInfo, Status};
use crate::{
    executor::{self, Envelope, Letter},
    instance::HostServices,
    instance::{Laned, Message, ProcessEvent, ProcessStatus},
};

/// A request posted to a service's mailbox, whose reply has yet to come.
#[derive(Debug)]
pub struct PendingReply {
    /// Where the reply comes.
    pub rx: crossbeam_channel::Receiver<Reply>,
    /// When the requester stops waiting.
    pub deadline: Instant,
    to: String,
    kind: String,
    timeout: Duration,
}

impl PendingReply {
    /// The reply, from what waiting for it gave: a reply, or a timeout or a service that
    /// stopped, in words.
    pub fn reply(self, got: Result<Reply, RecvTimeoutError>) -> Reply {
        let PendingReply {
            to, kind, timeout, ..
        } = self;
        match got {
            Ok(reply) => reply,
            Err(RecvTimeoutError::Timeout) => timed_out(&to, &kind, timeout),
            Err(RecvTimeoutError::Disconnected) => Reply::error(
                codes::NOT_FOUND,
                format!("service `{to}` stopped before replying"),
            ),
        }
    }
}

impl KernelInner {
    /// The reply to a request for a service this host of a fleet does not own: `421`
    /// naming the owner; `503` while no host owns it (a failover under way).
    fn not_here(&self, to: &str) -> Reply {
        match self.owner_of(to) {
            Some(owner) => Reply::error(
                codes::MISDIRECTED,
                format!("service `{to}` runs on node `{owner}` of the fleet, not on this host"),
            ),
            None => Reply::error(
                codes::UNAVAILABLE,
                format!("no host of the fleet runs `{to}` right now (a failover may be under way): try again shortly"),
            ),
        }
    }
}

/// The reply to a request `to` did not answer within `timeout`.
fn timed_out(to: &str, kind: &str, timeout: Duration) -> Reply {
    Reply::error(
        codes::TIMEOUT,
        format!("`{to}` did not reply to `{kind}` within {timeout:?}"),
    )
}

/// The name under which the kernel answers requests and receives events.
pub const KERNEL: &str = "kernel";

/// What one service's instances see of the host: the service's name and a weak handle to
/// the kernel (a plugin holding its handle must not keep the kernel alive).
struct ServiceContext {
    service: Arc<str>,
    kernel: Weak<KernelInner>,
    /// The fleet's placement, when the host is one of a fleet: asked before and after
    /// each request (without it, nothing is asked: a request costs no more).
    placement: Option<Arc<dyn super::Placement>>,
}

pub(super) fn context(service: &str, kernel: &KernelInner) -> Arc<dyn HostServices> {
    Arc::new(ServiceContext {
        service: Arc::from(service),
        kernel: kernel.weak_self(),
        placement: kernel.config.placement.clone(),
    })
}

impl HostServices for ServiceContext {
    fn log(&self, level: LogLevel, target: &str, message: &str) {
        let service = &*self.service;
        let (target, message) = (printable(target), printable(message));
        match level {
            LogLevel::Error => {
                tracing::error!(target: "plugin", service = %service, module = %target, "{message}")
            }
            LogLevel::Warn => {
                tracing::warn!(target: "plugin", service = %service, module = %target, "{message}")
            }
            LogLevel::Info => {
                tracing::info!(target: "plugin", service = %service, module = %target, "{message}")
            }
            LogLevel::Debug => {
                tracing::debug!(target: "plugin", service = %service, module = %target, "{message}")
            }
            LogLevel::Trace => {
                tracing::trace!(target: "plugin", service = %service, module = %target, "{message}")
            }
        }
    }

    fn request(&self, to: &str, kind: &str, payload: &[u8], timeout: Duration) -> Reply {
        match self.kernel.upgrade() {
            Some(kernel) => kernel.route_request(
                Some(&self.service),
                executor::current_chain(),
                to,
                kind,
                payload,
                timeout,
            ),
            None => Reply::error(codes::NOT_FOUND, "the kernel is shutting down"),
        }
    }

    fn emit(&self, to: &str, kind: &str, payload: &[u8]) -> Result<(), String> {
        match self.kernel.upgrade() {
            Some(kernel) => kernel.route_event(Some(&self.service), to, kind, payload),
            None => Err("the kernel is shutting down".into()),
        }
    }

    fn saved_state(&self) -> Result<Option<(String, Vec<u8>)>, String> {
        let Some(kernel) = self.kernel.upgrade() else {
            return Ok(None);
        };
        let Some(store) = kernel.states() else {
            return Ok(None);
        };
        match store.load(&self.service) {
            Ok(saved) => Ok(saved.map(|saved| (saved.version, saved.bytes))),
            Err(error) => Err(plugin_api::error_chain(&error)),
        }
    }

    fn may_serve(&self) -> bool {
        self.placement
            .as_ref()
            .is_none_or(|placement| placement.owns(&self.service))
    }

    fn nudge(&self) {
        if let Some(slot) = self.kernel.upgrade().and_then(|k| k.slot(&self.service)) {
            let _ = slot.mailbox.tx.try_send(Envelope::Nudge);
        }
    }

    fn process_status(&self, status: &ProcessStatus, event: ProcessEvent) {
        let Some(kernel) = self.kernel.upgrade() else {
            return;
        };
        match event {
            ProcessEvent::Crashed => kernel.metrics.worker_crashed(&self.service),
            ProcessEvent::Restarted => kernel.metrics.worker_restarted(&self.service),
            ProcessEvent::Started => {}
        }
        if status.gave_up {
            if let Some(slot) = kernel.slot(&self.service) {
                let last = status.last_crash.as_deref().unwrap_or("no crash recorded");
                slot.update(|info| {
                    info.last_error = Some(format!(
                        "its worker process crashed too often and is not restarted (`ctl start` brings the service back from its last checkpoint); the last crash: {last}"
                    ))
                });
            }
        }
    }
}

impl KernelInner {
    /// Routes a request from `from` (`None`: from outside the host) and waits for its reply,
    /// at most `timeout` in all (waiting for room in a full mailbox included). `chain` lists
    /// the services waiting on this request.
    pub(crate) fn route_request(
        &self,
        from: Option<&Arc<str>>,
        chain: Vec<Arc<str>>,
        to: &str,
        kind: &str,
        payload: &[u8],
        timeout: Duration,
    ) -> Reply {
        if let Some(reply) = self.through_lane(from, &chain, to, kind, payload, timeout) {
            return reply;
        }
        match self.post_request(from, chain, to, kind, payload, timeout, timeout) {
            Ok(pending) => {
                let got =
                    executor::recv_soon(&pending.rx, self.config.spin, Some(pending.deadline));
                pending.reply(got)
            }
            Err(reply) => reply,
        }
    }

    /// Handles a request on this thread through its service's lane, when the service has
    /// one (an isolated service), runs, and is idle (see
    /// [`crate::executor::Mailbox::through_lane`]): one hop, to the worker, instead of two.
    /// `None` when not: the request is posted then, and every check is made there.
    fn through_lane(
        &self,
        from: Option<&Arc<str>>,
        chain: &[Arc<str>],
        to: &str,
        kind: &str,
        payload: &[u8],
        timeout: Duration,
    ) -> Option<Reply> {
        if to == KERNEL || chain.iter().any(|waiting| &**waiting == to) {
            return None;
        }
        let slot = self.slot(to)?;
        if slot.status() != Status::Running || !self.may_run(to) {
            return None;
        }
        let request = Message {
            from: from.map_or("external", |from| &**from),
            to,
            kind,
            payload,
        };
        let reply = match slot
            .mailbox
            .through_lane(request, chain, Instant::now() + timeout)
        {
            Laned::Replied(reply) => reply,
            Laned::TimedOut => timed_out(to, kind, timeout),
            Laned::Refused => return None,
        };
        // Handled while this host's ownership lapsed: not answered from a state another
        // host has taken over.
        Some(if self.may_run(to) {
            reply
        } else {
            self.not_here(to)
        })
    }

    /// Routes a request without waiting for its reply: waits at most `room` for room in a
    /// full mailbox, and returns where the reply will come (within `timeout`), or the reply
    /// already known (404, 508, a full mailbox, a request to the kernel).
    #[expect(clippy::too_many_arguments, reason = "a request's parts, passed once")]
    pub(crate) fn post_request(
        &self,
        from: Option<&Arc<str>>,
        chain: Vec<Arc<str>>,
        to: &str,
        kind: &str,
        payload: &[u8],
        timeout: Duration,
        room: Duration,
    ) -> Result<PendingReply, Reply> {
        if to == KERNEL {
            return Err(self.kernel_request(kind, payload));
        }
        if chain.iter().any(|waiting| &**waiting == to) {
            let chain: Vec<&str> = chain.iter().map(|s| &**s).collect();
            return Err(Reply::error(
                codes::LOOP,
                format!("call loop: {} -> {to}", chain.join(" -> ")),
            ));
        }
        let Some(slot) = self.slot(to) else {
            return Err(Reply::error(codes::NOT_FOUND, format!("no service `{to}`")));
        };
        let status = slot.status();
        if !self.may_run(to) {
            // In a fleet, what another host owns (or no host, during a failover).
            let reply = self.not_here(to);
            self.metrics.refused(to, reply.code);
            return Err(reply);
        }
        if !matches!(status, Status::Running | Status::Starting) {
            self.metrics.refused(to, codes::NOT_FOUND);
            return Err(Reply::error(
                codes::NOT_FOUND,
                format!("service `{to}` is not running ({status})"),
            ));
        }
        let sent = Instant::now();
        let deadline = sent + timeout;
        let (reply_tx, reply_rx) = bounded(1);
        let envelope = Envelope::Request {
            letter: Letter::new(from.cloned(), kind, payload),
            chain,
            reply: reply_tx,
            sent,
        };
        match slot.mailbox.tx.send_timeout(envelope, room.min(timeout)) {
            Ok(()) => Ok(PendingReply {
                rx: reply_rx,
                deadline,
                to: to.to_owned(),
                kind: kind.to_owned(),
                timeout,
            }),
            Err(SendTimeoutError::Timeout(_)) => {
                self.metrics.refused(to, codes::TIMEOUT);
                Err(Reply::error(
                    codes::TIMEOUT,
                    format!(
                        "the mailbox of `{to}` stayed full for {:?}",
                        room.min(timeout)
                    ),
                ))
            }
            Err(SendTimeoutError::Disconnected(_)) => Err(Reply::error(
                codes::NOT_FOUND,
                format!("service `{to}` is gone"),
            )),
        }
    }

    /// Queues an event; fails when the target does not run or its mailbox is full.
    pub(crate) fn route_event(
        &self,
        from: Option<&Arc<str>>,
        to: &str,
        kind: &str,
        payload: &[u8],
    ) -> Result<(), String> {
        if to == KERNEL {
            tracing::info!(
                target: "kernel",
                from = from.map_or("external", |f| &**f),
                kind,
                payload = %String::from_utf8_lossy(&payload[..payload.len().min(256)]),
                "event for the kernel"
            );
            return Ok(());
        }
        let slot = self.slot(to).ok_or_else(|| format!("no service `{to}`"))?;
        let status = slot.status();
        if !self.may_run(to) {
            return Err(self.not_here(to).message);
        }
        if !matches!(status, Status::Running | Status::Starting) {
            return Err(format!("service `{to}` is not running ({status})"));
        }
        let envelope = Envelope::Event {
            letter: Letter::new(from.cloned(), kind, payload),
        };
        slot.mailbox.tx.try_send(envelope).map_err(|e| match e {
            TrySendError::Full(_) => format!(
                "the mailbox of `{to}` is full ({} messages); event `{kind}` not queued",
                self.config.mailbox_capacity
            ),
            TrySendError::Disconnected(_) => format!("service `{to}` is gone"),
        })
    }

    /// Requests addressed to `kernel`: the command is the kind, or, when the kind is none of
    /// the kernel's, the payload (so that `ctl send kernel list` works as it reads).
    fn kernel_request(&self, kind: &str, payload: &[u8]) -> Reply {
        const COMMANDS: [&str; 3] = ["ping", "list", "version"];
        let command = if COMMANDS.contains(&kind) {
            kind
        } else {
            std::str::from_utf8(payload).map_or(kind, str::trim)
        };
        match command {
            "ping" => Reply::json(&serde_json::json!({
                "pong": true,
                "uptime_ms": u64::try_from(self.uptime().as_millis()).unwrap_or(u64::MAX),
            })),
            "list" => Reply::json(&self.list().iter().map(list_entry).collect::<Vec<_>>()),
            "version" => Reply::json(&serde_json::json!({
                "host": env!("CARGO_PKG_VERSION"),
                "plugin_abi": plugin_api::abi::ABI_VERSION,
            })),
            _ => Reply::error(
                codes::BAD_REQUEST,
                format!(
                    "the kernel understands `ping`, `list` and `version` (as the kind or as the payload), not kind `{kind}` with payload `{}`",
                    String::from_utf8_lossy(&payload[..payload.len().min(64)])
                ),
            ),
        }
    }
}

/// What a plugin reads of a service when it asks `kernel` for `list`: the kernel's own
/// answer to its plugins (the control socket's `list` has a type of its own).
fn list_entry(info: &ServiceInfo) -> serde_json::Value {
    serde_json::json!({
        "name": info.name,
        "version": info.version,
        "status": info.status.to_string(),
        "dependencies": info.dependencies,
        "path": info.path,
        "sha256": info.sha256,
        "loaded_since": info.loaded_since,
        "swaps": info.swaps,
        "last_error": info.last_error,
        "pinned": info.pinned,
    })
}

/// The most of a plugin's log line the host logs (its message, or its target).
pub(crate) const MAX_PLUGIN_LOG_LINE: usize = 64 << 10;

/// `text` as one line of the host's log: line breaks escaped (a plugin's text cannot forge
/// a line of the host's), cut after [`MAX_PLUGIN_LOG_LINE`] bytes, saying how much was cut.
fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    let breaks = |c: char| c == '\n' || c == '\r';
    if text.len() <= MAX_PLUGIN_LOG_LINE && !text.contains(breaks) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut end = text.len().min(MAX_PLUGIN_LOG_LINE);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let mut line = text[..end].replace('\n', "\\n").replace('\r', "\\r");
    if end < text.len() {
        line.push_str(&format!("… ({} bytes cut)", text.len() - end));
    }
    std::borrow::Cow::Owned(line)
}

#[cfg(test)]
mod printable_tests {
    #[test]
    fn a_plugins_line_cannot_forge_another_and_is_cut_when_huge() {
        assert_eq!(super::printable("one line"), "one line");
        assert_eq!(
            super::printable("a\nFAKE ERROR line\rx"),
            "a\\nFAKE ERROR line\\rx"
        );
        let huge = "é".repeat(super::MAX_PLUGIN_LOG_LINE);
        let cut = super::printable(&huge);
        assert!(cut.len() < super::MAX_PLUGIN_LOG_LINE + 64, "{}", cut.len());
        assert!(cut.ends_with("bytes cut)"));
    }
}
