//! Isolated services: a plugin file run in a worker process of its own, driven through the
//! executor's seam ([`crate::instance`]) like a library opened in the host.
//!
//! - [`IsolatedPlugin`] is the [`crate::instance::InstanceSource`]: a private copy of the
//!   file, its manifest (read in a child process: the host never opens the file), and how its
//!   workers run. Each instance it creates starts a worker (`microkernel worker`, the host's
//!   own program, as the probe is) that opens the file and creates the plugin's instance.
//! - The instance forwards every call over a socket pair ([`protocol`]: postcard frames)
//!   and answers the plugin's callbacks (log, request with the call chain, emit) on the
//!   executor's thread while it waits; a second socket carries the callbacks of the
//!   plugin's own threads, served by a host thread.
//! - A worker that dies (a signal, an exit, a closed socket) or does not answer in time
//!   (it is killed) costs the request in flight a `503` reply. The instance brings up a
//!   new worker from the service's last durable state, with backoff, and leaves the
//!   service failed after too many crashes within a window ([`Isolation`]).
//! - [`run_worker_child`] is the worker's side.
//!
//! The state key, the state directory and every other service stay in the host: the worker
//! sees its own file, its configuration text, and the state the host sends it.

mod bare;
mod child;
mod isolated;
mod process;
mod protocol;

pub use bare::{run_bare_child, BarePeer};
pub use child::{run_worker_child, Limits, EXIT_NO_HOST};
pub use isolated::{read_manifest, IsolatedPlugin, Isolation};
