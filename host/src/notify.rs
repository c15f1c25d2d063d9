//! The service manager's notifications (`sd_notify`): when `$NOTIFY_SOCKET` is set (systemd's
//! `Type=notify` and `Type=notify-reload` units), the daemon says `READY=1` once its services
//! are up, `RELOADING=1` (with `MONOTONIC_USEC`) when a rescan begins and `READY=1` again when
//! it ends, and `STOPPING=1` when it begins to stop; each with a `STATUS=` line. Without the
//! variable nothing is sent. A notification that cannot be sent is logged and changes
//! nothing else.

use sd_notify::NotifyState;

fn send(states: &[NotifyState<'_>]) {
    // The variable stays set: later notifications need it (`unset_env: false`).
    if let Err(error) = sd_notify::notify(false, states) {
        tracing::warn!(%error, socket = ?std::env::var_os("NOTIFY_SOCKET"), "could not notify the service manager");
    }
}

/// The services are up (after start-up, or after a rescan): `READY=1`.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A rescan begins: `RELOADING=1` and the monotonic time (which `Type=notify-reload` needs).
pub fn reloading() {
    let mut states = vec![
        NotifyState::Reloading,
        NotifyState::Status("rescanning the plugins directory"),
    ];
    if let Ok(now) = NotifyState::monotonic_usec_now() {
        states.push(now);
    }
    send(&states);
}

/// The host begins to stop: `STOPPING=1`.
pub fn stopping(status: &str) {
    send(&[NotifyState::Stopping, NotifyState::Status(status)]);
}
