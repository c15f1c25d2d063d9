//! The microkernel plugin host's engine: loads service plugins (`cdylib`s built with the
//! SDK), runs each service on its own executor thread, routes requests and events between
//! them, persists their state encrypted, and replaces a running service with a new version
//! of its plugin without losing a request or its state.
//!
//! This crate is the engine only: no command line, no daemon, no control socket (those are
//! the `microkernel` crate's, the application). Plugin authors do not need it: they depend
//! on the SDK only. Its API is used by the application and the test suite and is not
//! stable.
//!
//! See `ARCHITECTURE.md` at the repository root for the code map and the invariants.

#![expect(
    clippy::result_large_err,
    reason = "errors are the cold path; they carry the plugin's typed failures, which tests and callers match by value"
)]

pub mod bounded;
pub mod instance;
pub mod kernel;
pub mod last_words;
pub mod loader;
pub mod metrics;
pub mod state;
pub mod worker;

mod executor;

pub use executor::{recv_soon, Call, InstanceError, OperationError, Unanswered};

/// An error and its causes in one line (see [`plugin_api::error_chain`]): what the host
/// shows wherever an error leaves it (reload reports, `ctl`, logs, the last error of a
/// service). Errors keep their cause in `source()` and out of their own message, so nothing
/// is said twice.
pub use plugin_api::error_chain;

pub use kernel::{
    BadStatePolicy, Checkpoint, Kernel, KernelConfig, KernelError, KernelStats, ServiceInfo,
    Status, StopReport,
};
pub mod reload;
pub mod trust;
