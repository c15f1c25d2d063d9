//! The executor thread: creates its instance through the [`crate::instance`] seam, imports,
//! starts, then serves the mailbox until an operation stops it or it is given up.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use crossbeam_channel::{Receiver, Sender};

use super::{
    ops::{self, Flow, OperationError},
    recv_soon, set_chain, Call, Doing, Envelope, InstanceError, Mailbox, HANDOFF_SPIN,
};
use crate::instance::{HostServices, InstanceSource, ServiceInstance};

/// Everything needed to bring up an instance.
pub(crate) struct Launch {
    pub service: String,
    /// What makes the instance: an opened library, a linked service.
    pub source: Arc<dyn InstanceSource>,
    /// What the instance calls back.
    pub services: Arc<dyn HostServices>,
    pub config: Option<String>,
    /// How long creating, importing and starting may each take.
    pub timeout: Duration,
    /// How long the executor polls its mailbox before it sleeps (see [`recv_soon`]).
    pub spin: Duration,
    /// Where its replies and events are counted.
    pub metrics: crate::metrics::ServiceMetrics,
    /// The service's mailbox, which the executor serves.
    pub mailbox: Mailbox,
}

/// The state an instance imports: the version that exported it, and the bytes (shared, so
/// that a hot replace keeps them for a rollback without a copy).
pub(crate) type State = (String, Arc<Vec<u8>>);

/// What an executor thread knows of itself.
pub(super) struct Me {
    pub service: Arc<str>,
    pub spin: Duration,
    pub metrics: crate::metrics::ServiceMetrics,
    pub doing: Doing,
    pub epoch: u64,
    pub given_up: Arc<AtomicBool>,
    pub late_state: Sender<Result<Vec<u8>, OperationError>>,
}

/// How a launching executor thread hears from the kernel, and answers.
pub(super) struct Waits {
    pub stages: Sender<Result<(), InstanceError>>,
    pub started: Sender<Result<(), InstanceError>>,
    pub state: Receiver<Option<State>>,
    pub go: Receiver<()>,
}

type Boxed = Box<dyn ServiceInstance>;

pub(super) fn run(launch: Launch, waits: Waits, me: Me) {
    let Launch {
        source,
        services,
        config,
        mailbox,
        timeout,
        ..
    } = launch;
    let doing = &me.doing;
    set_chain(&[], Some(&me.service));
    crate::last_words::on_executor(&me.service);
    let host = services.clone();
    let created = doing.call(Call::New, || source.create(services, config.as_deref()));
    let mut instance = match created {
        Ok(instance) => instance,
        Err(e) => {
            let error = match e {
                crate::instance::CreateError::Plugin(message) => InstanceError::Create(message),
                crate::instance::CreateError::Host(message) => InstanceError::Unavailable(message),
                crate::instance::CreateError::TimedOut(_) => InstanceError::Timeout {
                    call: Call::New,
                    timeout,
                },
            };
            let _ = waits.stages.send(Err(error));
            return;
        }
    };
    // Dropped on this thread before it ends (and, on failure, before the answer, so that
    // the launcher's wait for the exit covers it).
    let drop_it = |instance: Boxed| doing.call(Call::Drop, || drop(instance));
    let failed = |error: InstanceError, instance: Boxed, to: &Sender<_>| {
        drop_it(instance);
        let _ = to.send(Err(error));
    };
    // The kernel gone from any of these waits gave the instance up.
    if waits.stages.send(Ok(())).is_err() {
        return drop_it(instance);
    }
    let Ok(state) = recv_soon(&waits.state, me.spin, None) else {
        return drop_it(instance);
    };
    if let Some((version, bytes)) = &state {
        let imported = doing.call(Call::ImportState, || instance.import_state(version, bytes));
        if let Err(e) = imported {
            let error = blame(
                &*instance,
                Call::ImportState,
                timeout,
                e,
                InstanceError::Import,
            );
            return failed(error, instance, &waits.stages);
        }
    }
    drop(state);
    if waits.stages.send(Ok(())).is_err() {
        return drop_it(instance);
    }
    if recv_soon(&waits.go, HANDOFF_SPIN, None).is_err() {
        return drop_it(instance);
    }
    if let Err(e) = doing.call(Call::Start, || instance.start()) {
        let error = blame(&*instance, Call::Start, timeout, e, InstanceError::Start);
        return failed(error, instance, &waits.started);
    }
    if waits.started.send(Ok(())).is_err() {
        // The kernel gave up waiting (see `Pending::stage`): this instance must not serve.
        ops::stop_logged(&me.service, &mut *instance, doing);
    } else {
        me.serve(&mut *instance, &mailbox, &*host);
    }
    set_chain(&[], None);
    drop_it(instance);
}

/// Whose doing a failed `call` of `instance` was: the host's (what ran it was lost to the
/// host), a timeout (what ran it was killed for not answering), or the plugin's (`plugin`).
fn blame(
    instance: &dyn ServiceInstance,
    call: Call,
    timeout: Duration,
    message: String,
    plugin: fn(String) -> InstanceError,
) -> InstanceError {
    if instance.lost_to_the_host() {
        InstanceError::Unavailable(message)
    } else if instance.timed_out() {
        InstanceError::Timeout { call, timeout }
    } else {
        plugin(message)
    }
}

impl Me {
    fn given_up(&self) -> bool {
        self.given_up.load(Ordering::Acquire)
    }

    /// Serves the mailbox until an operation ends it; with the instance's lane open, if it
    /// has one, for requests to skip this thread while it is idle.
    fn serve(
        &self,
        instance: &mut dyn ServiceInstance,
        mailbox: &Mailbox,
        host: &dyn HostServices,
    ) {
        let Some(lane) = instance.lane() else {
            return self.serve_mailbox(instance, mailbox, host, false);
        };
        mailbox.open(lane.clone(), self.metrics.clone());
        self.serve_mailbox(instance, mailbox, host, true);
        mailbox.close(&lane);
    }

    fn serve_mailbox(
        &self,
        instance: &mut dyn ServiceInstance,
        mailbox: &Mailbox,
        host: &dyn HostServices,
        gated: bool,
    ) {
        let (service, doing) = (&*self.service, &self.doing);
        loop {
            if self.given_up() {
                // The kernel stopped waiting for this executor (a stop that did not finish in
                // time) and may have started another on the same mailbox: serve nothing more,
                // and hand over the state for the kernel to save.
                let _ = self.late_state.send(ops::export(instance, doing));
                ops::stop_logged(service, instance, doing);
                return;
            }
            let next = if gated {
                mailbox.take(self.spin)
            } else {
                recv_soon(&mailbox.rx, self.spin, None)
            };
            let Ok(envelope) = next else {
                return;
            };
            match envelope {
                Envelope::Request {
                    letter,
                    chain,
                    reply,
                    sent,
                } => {
                    // In a fleet, what waited here while this host's ownership lapsed is
                    // refused, not answered from a state another host has taken over.
                    let answer = if host.may_serve() {
                        set_chain(&chain, Some(&self.service));
                        let answer =
                            doing.call(Call::Handle, || instance.handle(letter.lend(service)));
                        set_chain(&[], Some(&self.service));
                        if host.may_serve() {
                            answer
                        } else {
                            not_owned(
                                service,
                                "while it handled the request (its result is not kept)",
                            )
                        }
                    } else {
                        not_owned(service, "before it got to the request")
                    };
                    self.metrics.reply(answer.code, sent.elapsed());
                    // The requester may have timed out and gone: nothing to do then.
                    let _ = reply.send(answer);
                }
                Envelope::Event { letter } => {
                    self.metrics.event();
                    let handled =
                        doing.call(Call::OnEvent, || instance.on_event(letter.lend(service)));
                    if let Err(error) = handled {
                        tracing::warn!(service, kind = letter.kind(), %error, "event handler failed");
                    }
                }
                Envelope::Op(op) => {
                    if op.run(self.epoch, instance, doing) == Flow::End {
                        return;
                    }
                }
                Envelope::Nudge => {}
            }
            instance.answered();
            if gated {
                mailbox.done();
            }
        }
    }
}

/// The reply to a request this host may no longer answer: its ownership of the service in
/// the fleet lapsed `when`.
fn not_owned(service: &str, when: &str) -> plugin_api::Reply {
    plugin_api::Reply::error(
        plugin_api::codes::MISDIRECTED,
        format!("this host's ownership of `{service}` in the fleet lapsed {when}: another node takes it over"),
    )
}
