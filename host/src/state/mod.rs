//! Encrypted, crash-safe service state.
//!
//! - [`keys`]: the state key (and old keys for rotation), read from a file or the
//!   environment, zeroed when dropped. There is no key in the code and no default key.
//! - [`cipher`]: the seam around AES-256-GCM: seal and open with associated data.
//! - [`store`]: one file per service, `<state-dir>/<service>.state`, written atomically and
//!   durably; its format is described in ARCHITECTURE.md and in [`store`].

pub mod cipher;
pub mod keys;
pub mod store;

pub use keys::{KeyError, KeyRing, StateKey};

/// The environment variable the daemon reads the state key from when no key file is
/// given. Removed from the environment of every process the host starts (probes, workers).
pub const KEY_VARIABLE: &str = "MICROKERNEL_STATE_KEY";
pub use store::{inspect, SavedState, StateError, StateHeader, StateStore};

#[cfg(test)]
mod tests;
