//! Loading, checking and unloading plugin libraries. **All of the host's `unsafe` is here.**
//!
//! - [`Loader`] opens plugin files. It copies each file to a private shadow path before
//!   `dlopen` (so that the plugins directory can be overwritten while a version runs, and two
//!   versions of a service can be loaded side by side), checks the ABI with a fresh
//!   `abi_stable` checker, and reads the manifest.
//! - [`Library`] is one opened plugin file: the costly, shareable thing. It is shared as an
//!   `Arc` by the kernel and by the instance created from it, and closed explicitly with
//!   [`Library::close`] once nothing else holds it.
//! - [`Instance`] is one service instance created by a library: the cheap, per-run thing.
//!   It is `!Send`: it is created, called and dropped on its service's executor thread.
//!   `Library` and `Instance` are this crate's in-process implementation of the executor's
//!   seam ([`crate::instance`]).
//! - [`Probe`] opens a file in a throwaway child process before the loader opens it here:
//!   a corrupt file that crashes `dlopen` or the ABI checks kills the child, not the host.
//! - [`threads`] tells which threads may run a library's code (a census), and joins host
//!   threads with a deadline: a library is closed only when no plugin code can run.
//! - `host_handle` turns a host-side [`crate::instance::HostServices`] implementation into
//!   the [`plugin_api::abi::HostHandle`] a plugin receives.
//!
//! **Invariant:** no pointer into a plugin's library outlives the library. Every value that
//! comes out of a plugin is copied into host memory before the call returns; instances hold
//! an `Arc<Library>`; the root module reference lives inside the `Library` it points into.

mod error;
mod file;
mod host_handle;
mod instance;
mod library;
mod load;
mod manifest;
mod open;
mod origin;
mod probe;
mod process;
mod shadow;
pub mod threads;

pub use error::LoadError;
pub use file::{PluginFile, MAX_PLUGIN_SIZE};
pub use instance::Instance;
pub use library::{is_mapped, loader_busy, loader_wedged, Library};
pub use load::{Loader, ShadowCopy};
pub use manifest::Manifest;
pub use probe::{run_probe_child, Probe, StateSource};
pub use process::{
    exit_without_destructors, limit_malloc_arenas, report_fatal_ends,
    report_fatal_signals_in_worker, PLUGIN_EXIT_STATUS,
};

/// Opens a plugin file in a worker process (see [`crate::worker`]), with no shadow copy of
/// its own: the host made the copy `open_path` of `path`.
pub(crate) fn open_for_worker(
    path: &std::path::Path,
    open_path: &std::path::Path,
) -> Result<Library, LoadError> {
    open::open(path, open_path, &[0; 32])
}

#[cfg(test)]
mod tests;
