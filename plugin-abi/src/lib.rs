//! The binary contract between the `microkernel` host and its service plugins: only the
//! types that cross the library boundary, and nothing else.
//!
//! **If you are writing a plugin, you do not need this crate directly:** depend on the SDK,
//! `microkernel-plugin-sdk` (imported as `plugin_api`), whose `Service` trait and
//! `export_service!` macro convert these types to and from plain Rust types. The SDK
//! re-exports this crate as `plugin_api::abi`.
//!
//! # Stability
//!
//! This crate's version *is* the ABI version. A host loads a plugin when both were built
//! against the same `0.x` minor (or `x.*` major) of this crate, and `abi_stable`'s layout
//! check finds every type here identical. SDK releases that change nothing here leave it
//! alone, so plugins built against an older SDK keep loading. A change to any type here is a
//! new minor version (while 0.x), and the host refuses plugins of another one, naming both.
//!
//! Everything here is `#[repr(C)]` and derives [`StableAbi`], so the host can check, when it
//! loads a plugin, that both sides agree on the layout of every type.
//!
//! Ownership rules, which the host relies on:
//! - A value created by one side and handed to the other is dropped by the receiver, through
//!   the drop function stored in the value (`RString`, `RVec`), which lives in the library
//!   that allocated it. The host therefore copies every value it receives from a plugin into
//!   host-owned memory right away, before the plugin's library can be closed.
//! - A [`RawService`]'s instance pointer is owned by the plugin and freed through
//!   [`ServiceVTable::drop`].
//! - A [`HostHandle`]'s context is owned by the host and released through [`HostVTable::drop`].
//!
//! The two handles' fields are private and their constructors `unsafe`: a handle's `Drop`
//! and `Clone` (and the host's calls through a service's vtable) dereference its pointers,
//! so safe code must not be able to make one up.

use std::ffi::c_void;

use abi_stable::{
    declare_root_module_statics,
    library::RootModule,
    package_version_strings,
    sabi_types::VersionStrings,
    std_types::{ROption, RResult, RSlice, RStr, RString, RVec},
    StableAbi,
};

/// Severity of a log line sent by a plugin to the host.
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    /// Something failed.
    Error = 1,
    /// Something looks wrong but the service carries on.
    Warn = 2,
    /// Normal operation worth recording.
    Info = 3,
    /// Detail for the plugin's author.
    Debug = 4,
    /// Very verbose detail.
    Trace = 5,
}

/// What a plugin says about itself, before any instance exists.
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct RManifest {
    /// Service name, `[a-z0-9][a-z0-9_-]{0,63}`; the host validates it.
    pub name: RString,
    /// Semantic version of this implementation of the service.
    pub version: RString,
    /// Names of the services that must be running before this one starts.
    pub dependencies: RVec<RString>,
}

/// A request or an event, as it crosses the boundary: borrowed from the host for the length
/// of the call. A plugin copies what it keeps (the SDK copies it all, once, into its own
/// memory), so nothing is allocated on one side of the boundary and freed on the other.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy)]
pub struct RMessage<'a> {
    /// The sending service, or `kernel`, or `external` for requests from outside the host.
    pub from: RStr<'a>,
    /// The receiving service.
    pub to: RStr<'a>,
    /// What is asked or announced; each service documents the kinds it understands.
    pub kind: RStr<'a>,
    /// Opaque bytes; JSON by convention.
    pub payload: RSlice<'a, u8>,
}

/// The answer to a request, as it crosses the boundary.
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct RReply {
    /// `0` for success, otherwise one of the SDK's `codes` or a service-specific code.
    pub code: u32,
    /// Human-readable explanation; empty on success.
    pub message: RString,
    /// Opaque bytes; JSON by convention.
    pub data: RVec<u8>,
}

/// Result type of the fallible calls into a plugin: the error is a message.
pub type RCallResult<T> = RResult<T, RString>;

/// The functions of a service instance, implemented by the plugin.
///
/// Every function takes the instance pointer [`RawService::this`]. Every function catches
/// panics and reports them as errors (or as a 500 reply), so none unwinds into the host.
#[repr(C)]
#[derive(StableAbi, Debug)]
pub struct ServiceVTable {
    /// Starts the service.
    pub start: unsafe extern "C" fn(this: *mut c_void) -> RCallResult<()>,
    /// Stops the service; it must join every thread it started.
    pub stop: unsafe extern "C" fn(this: *mut c_void) -> RCallResult<()>,
    /// Handles one request and returns the reply.
    pub handle: unsafe extern "C" fn(this: *mut c_void, request: RMessage<'_>) -> RReply,
    /// Handles one event.
    pub on_event: unsafe extern "C" fn(this: *mut c_void, event: RMessage<'_>) -> RCallResult<()>,
    /// Serializes the service's state.
    pub export_state: unsafe extern "C" fn(this: *mut c_void) -> RCallResult<RVec<u8>>,
    /// Replaces the service's state with one exported by `from_version` of the service.
    pub import_state: unsafe extern "C" fn(
        this: *mut c_void,
        from_version: RStr<'_>,
        state: RSlice<'_, u8>,
    ) -> RCallResult<()>,
    /// Frees the instance.
    pub drop: unsafe extern "C" fn(this: *mut c_void),
}

/// A service instance created by a plugin: an opaque pointer and its functions.
///
/// Both pointers point into the plugin's library. The host's loader wraps this in a type
/// that keeps the library open for as long as the instance lives. Safe code cannot pair a
/// pointer with functions that do not expect it:
///
/// ```compile_fail,E0451
/// # use plugin_api::abi::{RawService, ServiceVTable};
/// fn forge(vtable: &'static ServiceVTable) -> RawService {
///     RawService { this: std::ptr::null_mut(), vtable }
/// }
/// ```
///
/// ```compile_fail,E0133
/// # use plugin_api::abi::{RawService, ServiceVTable};
/// fn forge(vtable: &'static ServiceVTable) -> RawService {
///     RawService::new(std::ptr::null_mut(), vtable)
/// }
/// ```
#[repr(C)]
#[derive(StableAbi, Debug)]
pub struct RawService {
    /// The instance, owned by the plugin.
    this: *mut c_void,
    /// The instance's functions, a static of the plugin.
    vtable: &'static ServiceVTable,
}

impl RawService {
    /// Pairs an instance pointer with its functions.
    ///
    /// # Safety
    /// `this` must be a live instance that every function of `vtable` accepts, owned by the
    /// returned value: the host calls those functions with it, from one thread at a time,
    /// and frees it exactly once with `vtable.drop`.
    pub unsafe fn new(this: *mut c_void, vtable: &'static ServiceVTable) -> Self {
        RawService { this, vtable }
    }

    /// The instance pointer, to pass to the vtable's functions.
    pub fn this(&self) -> *mut c_void {
        self.this
    }

    /// The instance's functions.
    pub fn vtable(&self) -> &'static ServiceVTable {
        self.vtable
    }
}

/// The functions the host offers to a plugin.
#[repr(C)]
#[derive(StableAbi, Debug)]
pub struct HostVTable {
    /// Returns a new reference to the same context.
    pub clone: unsafe extern "C" fn(ctx: *const c_void) -> *const c_void,
    /// Releases one reference to the context.
    pub drop: unsafe extern "C" fn(ctx: *const c_void),
    /// Writes a log line attributed to the service; `target` is the plugin's module path.
    pub log: unsafe extern "C" fn(
        ctx: *const c_void,
        level: LogLevel,
        target: RStr<'_>,
        message: RStr<'_>,
    ),
    /// Sends a request to a service (or to `kernel`) and waits at most `timeout_ms` for the reply.
    pub request: unsafe extern "C" fn(
        ctx: *const c_void,
        to: RStr<'_>,
        kind: RStr<'_>,
        payload: RSlice<'_, u8>,
        timeout_ms: u64,
    ) -> RReply,
    /// Queues an event for a service (or for `kernel`); fails if its mailbox is full.
    pub emit: unsafe extern "C" fn(
        ctx: *const c_void,
        to: RStr<'_>,
        kind: RStr<'_>,
        payload: RSlice<'_, u8>,
    ) -> RCallResult<()>,
}

/// The handle to the host that a plugin receives when one of its instances is created.
///
/// The context is owned by the host; the vtable is a static of the host, which outlives
/// every plugin. Cloning and dropping go through the vtable.
///
/// Safe code cannot make one up (its `Drop` would hand the host a pointer it never gave):
///
/// ```compile_fail,E0451
/// # use plugin_api::abi::{HostHandle, HostVTable};
/// fn forge(vtable: &'static HostVTable) -> HostHandle {
///     HostHandle { ctx: std::ptr::null(), vtable }
/// }
/// ```
///
/// ```compile_fail,E0133
/// # use plugin_api::abi::{HostHandle, HostVTable};
/// fn forge(vtable: &'static HostVTable) -> HostHandle {
///     HostHandle::new(std::ptr::null(), vtable)
/// }
/// ```
#[repr(C)]
#[derive(StableAbi)]
pub struct HostHandle {
    /// Host-owned context (which service this handle belongs to, and the kernel).
    ctx: *const c_void,
    /// The host's functions.
    vtable: &'static HostVTable,
}

impl HostHandle {
    /// Pairs a host context with the host's functions. The handle owns one reference to
    /// `ctx`, released by its `Drop`.
    ///
    /// # Safety
    /// `ctx` must be a live context that every function of `vtable` accepts, from any
    /// thread, and the returned handle must own one reference to it: `vtable.clone` returns
    /// a new reference, `vtable.drop` releases one, and the context lives while any
    /// reference does.
    pub unsafe fn new(ctx: *const c_void, vtable: &'static HostVTable) -> Self {
        HostHandle { ctx, vtable }
    }

    /// The host context, to pass to the vtable's functions while `self` is alive.
    pub fn ctx(&self) -> *const c_void {
        self.ctx
    }

    /// The host's functions.
    pub fn vtable(&self) -> &'static HostVTable {
        self.vtable
    }
}

// SAFETY: the host implements every function of `HostVTable` for any thread, and the context
// it points to is reference-counted and thread-safe on the host side.
unsafe impl Send for HostHandle {}
// SAFETY: as above; no function takes the context mutably.
unsafe impl Sync for HostHandle {}

impl Clone for HostHandle {
    fn clone(&self) -> Self {
        // SAFETY: `ctx` is a live context of this vtable for as long as `self` exists (the
        // contract of `HostHandle::new`, the only way to make one).
        let ctx = unsafe { (self.vtable.clone)(self.ctx) };
        HostHandle {
            ctx,
            vtable: self.vtable,
        }
    }
}

impl Drop for HostHandle {
    fn drop(&mut self) {
        // SAFETY: `self` owns one reference to `ctx` (`HostHandle::new`'s contract, and
        // `clone` returns a new one), released exactly once here.
        unsafe { (self.vtable.drop)(self.ctx) }
    }
}

impl std::fmt::Debug for HostHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostHandle").finish_non_exhaustive()
    }
}

/// The root module every plugin exports, checked by the host when it loads the library.
///
/// New fields may only be added after the last prefix field, so that a plugin built against
/// a newer `plugin-api` still loads into an older host.
#[repr(C)]
#[derive(StableAbi, Debug)]
#[sabi(kind(Prefix(prefix_ref = PluginModRef)))]
#[sabi(missing_field(panic))]
pub struct PluginMod {
    /// Describes the service this library implements.
    pub manifest: extern "C" fn() -> RManifest,
    /// Creates a service instance, given a handle to the host and the plugin's configuration.
    #[sabi(last_prefix_field)]
    pub new_service:
        extern "C" fn(host: HostHandle, config: ROption<RString>) -> RCallResult<RawService>,
}

impl RootModule for PluginModRef {
    declare_root_module_statics! {PluginModRef}
    const BASE_NAME: &'static str = "microkernel_plugin";
    const NAME: &'static str = "microkernel_plugin";
    const VERSION_STRINGS: VersionStrings = package_version_strings!();
}

impl std::fmt::Debug for PluginModRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginModRef").finish_non_exhaustive()
    }
}

/// The symbol under which every plugin exports its root module (see the SDK's `export_service!`).
///
/// The export macro has to spell this name as a literal; a test checks that it is abi_stable's.
pub const ROOT_MODULE_SYMBOL: &str = "_1as_0lib_1header_0root_bmodule_bloader";

/// The ABI version: this crate's version, as compiled into hosts and plugins. The host
/// refuses a plugin built against another `0.x` minor.
pub const ABI_VERSION: &str = env!("CARGO_PKG_VERSION");
