//! The service manager's notifications (`sd_notify`): when `$NOTIFY_SOCKET` is set (systemd's
//! `Type=notify` and `Type=notify-reload` units), the daemon says `READY=1` once its services
//! are up, `RELOADING=1` (with `MONOTONIC_USEC`) when a rescan begins and `READY=1` again when
//! it ends, and `STOPPING=1` when it begins to stop; each with a `STATUS=` line. Without the
//! variable nothing is sent.
//!
//! A notification is one datagram, sent without waiting: a manager that does not read its
//! socket (its queue full) loses that notification, with a warning, and never holds back a
//! rescan or a stop. A name starting with `@` is an abstract socket, as systemd allows.

use std::{
    io,
    os::{
        linux::net::SocketAddrExt,
        unix::net::{SocketAddr, UnixDatagram},
    },
};

fn send(message: &str) {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sent = (|| -> io::Result<()> {
        let bytes = std::os::unix::ffi::OsStrExt::as_bytes(target.as_os_str());
        let address = match bytes.strip_prefix(b"@") {
            Some(name) => SocketAddr::from_abstract_name(name)?,
            None => SocketAddr::from_pathname(&target)?,
        };
        let socket = UnixDatagram::unbound()?;
        socket.set_nonblocking(true)?;
        socket.send_to_addr(message.as_bytes(), &address)?;
        Ok(())
    })();
    if let Err(error) = sent {
        let first = message.lines().next().unwrap_or_default();
        tracing::warn!(%error, socket = ?target, notification = first, "could not notify the service manager (the notification is dropped)");
    }
}

/// The services are up (after start-up, or after a rescan): `READY=1`.
pub fn ready(status: &str) {
    send(&format!("READY=1\nSTATUS={status}\n"));
}

/// A rescan begins: `RELOADING=1` and the monotonic time (which `Type=notify-reload` needs).
pub fn reloading() {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() * 1_000_000 + t.tv_nsec() / 1_000)
        .unwrap_or(0);
    send(&format!(
        "RELOADING=1\nSTATUS=rescanning the plugins directory\nMONOTONIC_USEC={now}\n"
    ));
}

/// The host begins to stop: `STOPPING=1`.
pub fn stopping(status: &str) {
    send(&format!("STOPPING=1\nSTATUS={status}\n"));
}
