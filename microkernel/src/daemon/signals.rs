//! The signals the daemon handles: held from the first constructor on, released once the
//! handlers are installed, and turned into [`Event`]s by a thread of their own.

use anyhow::Context;
use crossbeam_channel::Sender;
use nix::sys::signal::{SigSet, Signal};
use signal_hook::consts::{SIGHUP, SIGINT};

use host::loader::threads;

use crate::event::Event;

/// The signals the daemon handles.
pub(super) const HANDLED: [Signal; 3] = [Signal::SIGHUP, Signal::SIGINT, Signal::SIGTERM];

pub(super) fn handled() -> SigSet {
    let mut set = SigSet::empty();
    for signal in HANDLED {
        set.add(signal);
    }
    set
}

/// Holds SIGHUP, SIGINT and SIGTERM on the calling thread (call it first in `main`, before
/// any thread exists): until [`release_signals`], they stay pending instead of killing the
/// process.
pub fn hold_signals() {
    let _ = handled().thread_block();
}

/// Lets SIGHUP, SIGINT and SIGTERM through again on the calling thread (and the threads it
/// starts from now on).
pub fn release_signals() {
    let _ = handled().thread_unblock();
}

pub(super) fn spawn_signal_thread(
    mut signals: signal_hook::iterator::Signals,
    events: Sender<Event>,
) -> anyhow::Result<signal_hook::iterator::Handle> {
    let handle = signals.handle();
    threads::spawn_detached("signals", move || {
        for signal in signals.forever() {
            let event = match signal {
                SIGHUP => {
                    tracing::info!("SIGHUP: rescanning the plugins directory");
                    Event::Reload {
                        service: None,
                        retry: false,
                        reply: None,
                    }
                }
                SIGINT => Event::Shutdown("SIGINT"),
                _ => Event::Shutdown("SIGTERM"),
            };
            if events.send(event).is_err() {
                return;
            }
        }
    })
    .context("starting the signal thread")?;
    Ok(handle)
}
