//! The contract between the `microkernel` host and its service plugins, and the SDK that
//! plugin authors use.
//!
//! **If you are writing a plugin**, you need three things from this crate: the [`Service`]
//! trait, the [`export_service!`] macro, and the logging macros ([`info!`], [`warn!`], ...).
//! Everything else is plumbing:
//!
//! ```no_run
//! use plugin_api::{export_service, BoxError, Host, Reply, Request, Service};
//!
//! struct Hello { host: Host }
//!
//! impl Service for Hello {
//!     const NAME: &'static str = "hello";
//!     const VERSION: &'static str = env!("CARGO_PKG_VERSION");
//!
//!     fn new(host: Host, _config: Option<&str>) -> Result<Self, BoxError> {
//!         Ok(Hello { host })
//!     }
//!
//!     fn handle(&mut self, request: Request) -> Result<Reply, BoxError> {
//!         Ok(Reply::ok(request.payload))
//!     }
//! }
//!
//! export_service!(Hello);
//! ```
//!
//! **If you are writing a host**, [`abi`] holds the `#[repr(C)]` types that cross the library
//! boundary and the root module ([`abi::PluginModRef`]) a host checks when it loads a plugin.
//!
//! # Stability
//!
//! What crosses the boundary lives in its own crate, [`abi`] (`microkernel-plugin-abi`),
//! whose version is the ABI version. A plugin loads into a host when both were built against
//! the same `0.x` minor of *that* crate and `abi_stable` finds every layout identical; this
//! SDK's own version does not matter, so a new SDK release that leaves the ABI alone needs no
//! plugin to be rebuilt. Anything else is refused with an error naming both ABI versions, or
//! the first layout mismatch.

/// The types that cross the library boundary: the ABI crate, `microkernel-plugin-abi`.
pub use plugin_abi as abi;
/// Re-exported so that a plugin can compare the `from_version` given to
/// [`Service::import_state`] without a dependency of its own:
/// `plugin_api::semver::Version::parse(from_version)?.major`.
pub use semver;
/// Re-exported so that a plugin can build and parse JSON payloads with no other dependency.
/// For typed state and payloads, add `serde = { version = "1", features = ["derive"] }` to
/// the plugin's own dependencies and derive `Serialize`/`Deserialize`: any serde version 1
/// works with this `serde_json`.
pub use serde_json;
mod forward;
mod sdk;

#[doc(hidden)]
pub mod __private;
#[cfg(feature = "testing")]
pub mod testing;

pub use forward::LEVEL_VARIABLE as LOG_LEVEL_VARIABLE;
#[doc(hidden)]
pub use sdk::export_parts;
pub use sdk::{
    codes, error_chain, is_valid_service_name, BadRequest, BoxError, Event, Host, Message, Reply,
    Request, Service, DEFAULT_REQUEST_TIMEOUT,
};

#[cfg(test)]
mod tests;
