//! What the host says when plugin code ends the process: which service, in which call.
//!
//! An in-process plugin that segfaults, aborts or calls `exit` takes the host with it;
//! isolation is the cure. Until then the host leaves one line on standard error naming the
//! service and the plugin call, written without allocating or locking from a signal handler
//! or an `atexit` hook (see `loader::process::report_fatal_ends`). This module holds what
//! that line says: each executor thread records its service once and the call it is in
//! around every call into the plugin, in thread-locals that need no initialization.

use std::cell::Cell;

/// The longest service name recorded (longer ones are cut).
const NAME_MAX: usize = 64;

thread_local! {
    /// The service of the executor running on this thread: its name's bytes and length.
    static SERVICE: Cell<([u8; NAME_MAX], u8)> = const { Cell::new(([0; NAME_MAX], 0)) };
    /// The plugin call this thread is in, or "".
    static CALL: Cell<&'static str> = const { Cell::new("") };
}

/// Records that this thread is the executor of `service`.
pub(crate) fn on_executor(service: &str) {
    let mut name = [0; NAME_MAX];
    let len = service.len().min(NAME_MAX);
    name[..len].copy_from_slice(&service.as_bytes()[..len]);
    SERVICE.with(|s| s.set((name, len as u8)));
}

/// Records the plugin call this thread is in (`""`: none).
pub(crate) fn in_call(call: &'static str) {
    CALL.with(|c| c.set(call));
}

/// What this thread was doing: its service's name (empty on a thread that is no executor)
/// and the plugin call it is in (empty between calls). Reads two thread-locals that need
/// no initialization, and allocates nothing: callable from a signal handler.
pub fn context() -> ([u8; NAME_MAX], usize, &'static str) {
    let (name, len) = SERVICE.with(Cell::get);
    (name, usize::from(len), CALL.with(Cell::get))
}
