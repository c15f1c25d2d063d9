//! What the daemon's main loop is asked to do, by its signal thread and by the control
//! socket: a module of its own below both, so that neither imports the other.

use crossbeam_channel::Sender;

/// What the main loop is asked to do.
#[derive(Debug)]
pub enum Event {
    /// Rescan the plugins directory (or one service's files); the lines of the outcome go to
    /// `reply` when given.
    Reload {
        /// Only this service.
        service: Option<String>,
        /// Try the rejected files again.
        retry: bool,
        /// Where the outcome goes (`(line, is_error)`).
        reply: Option<Sender<Vec<(String, bool)>>>,
    },
    /// Stop every service and exit.
    Shutdown(&'static str),
}
