//! Encrypted, crash-safe service state.
//!
//! - [`keys`]: the state key (and old keys for rotation), read from a file or the
//!   environment, zeroed when dropped. There is no key in the code and no default key.
//! - [`cipher`]: the seam around AES-256-GCM: seal and open with associated data.
//! - [`store`]: one file per service, `<state-dir>/<service>.state`, written atomically and
//!   durably; its format is described in ARCHITECTURE.md and in [`store`].
//! - [`backend`]: the seam the kernel keeps states through: the state directory, or a
//!   store a fleet shares.

pub mod backend;
pub mod cipher;
pub mod keys;
pub mod store;

pub use keys::{KeyError, KeyRing, StateKey};

/// The environment variable the daemon reads the state key from when no key file is
/// given. Removed from the environment of every process the host starts (probes, workers).
pub const KEY_VARIABLE: &str = "MICROKERNEL_STATE_KEY";
pub use backend::StateBackend;
pub use store::{
    inspect, open_sealed, seal_state, SavedState, StateError, StateHeader, StateStore,
};

#[cfg(test)]
mod tests;
