//! The seam between the kernel and where service states are kept.

use std::path::PathBuf;

use super::{SavedState, StateError, StateStore};

/// Where sealed service states are kept: the state directory ([`StateStore`], the
/// embedded default), or a store a fleet of hosts shares. The kernel saves, loads and
/// sets states aside only through this.
///
/// Every implementation keeps the same sealed bytes (see [`super::store`]): AES-256-GCM,
/// the header bound to the service and the format, and the key never leaves the host.
pub trait StateBackend: Send + Sync + std::fmt::Debug {
    /// Seals `bytes`, exported by `version` of `service`, and saves them durably in place
    /// of the service's last state; on failure the last state is still there.
    fn save(&self, service: &str, version: &str, bytes: &[u8]) -> Result<(), StateError>;
    /// The service's last state, if it has one.
    fn load(&self, service: &str) -> Result<Option<SavedState>, StateError>;
    /// Sets the service's unusable state aside, where it is kept, and says where.
    fn quarantine(&self, service: &str) -> Result<PathBuf, StateError>;
    /// Where the service's state is, for messages: a path, or a key of the shared store.
    fn location(&self, service: &str) -> PathBuf;
    /// Bytes of sealed states (and records) written durably since it was opened.
    fn bytes_written(&self) -> u64;
}

impl StateBackend for StateStore {
    fn save(&self, service: &str, version: &str, bytes: &[u8]) -> Result<(), StateError> {
        StateStore::save(self, service, version, bytes)
    }

    fn load(&self, service: &str) -> Result<Option<SavedState>, StateError> {
        StateStore::load(self, service)
    }

    fn quarantine(&self, service: &str) -> Result<PathBuf, StateError> {
        StateStore::quarantine(self, service)
    }

    fn location(&self, service: &str) -> PathBuf {
        self.path(service)
    }

    fn bytes_written(&self) -> u64 {
        StateStore::bytes_written(self)
    }
}
